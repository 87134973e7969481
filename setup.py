"""omnitrain_jax: one-pass three-stream open-vocabulary detection training in JAX.

Versions are pinned to what was installed and tested together (CPU, Python 3.11,
2026-11). The default install does not need TensorFlow: input pipelines use grain,
TensorBoard event files are written with tensorboardX (650 KB) instead of
clu.metric_writers, which imports TensorFlow and TensorBoard (about 1.5 GB).
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pillow==13.0.0",
    "pycocotools==2.0.11",
    "faster-coco-eval==1.8.0",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "tensorboardX==2.6.5",
    "opencv-python-headless==5.0.0.93",
    "simplejpeg==1.9.0",
    "etils==1.15.0",
    # jax.export (de)serialization (omnitrain_jax.export, serving); not a jax
    # dependency.
    "flatbuffers==25.12.19",
]

setuptools.setup(
    name="omnitrain_jax",
    version="0.1.0",
    description="OmniTrain: det + grounding + caption streams, one ViT, one head, "
                "token-only open-vocabulary detection in JAX/Flax.",
    packages=setuptools.find_packages(include=["omnitrain_jax", "omnitrain_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # selenium drives the system chromium in tests/serve_test.py
        # (.ci/install_browser.sh installs chromium and chromium-driver);
        # filelock guards the shared JAX compilation cache
        # of a test run across pytest-xdist workers (conftest.py).
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "selenium==4.51.0",
                 "filelock==4.3.1"],
        # CUDA 12 wheels of the same jax release.
        "gpu": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
