r"""Times OmniDet's forward and a forward+backward+SGD step on one device.

A quick check of a model configuration on an accelerator (compile time, step
time, peak memory), not a training run; the loss is a stand-in with the
model's real output shapes. Example::

  python benchmarks/model_forward.py --variant=B/16 --image_size=768 \
      --batch=8 --dtype=bfloat16 --remat
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.models import omnidet


def _stand_in_loss(out):
  # Sigmoid BCE against "first candidate positive" + L1 boxes: touches every
  # output the real losses use, with the same shapes.
  logits = out["pred_logits"]  # [B, N, Q]
  mask = out["candidate_mask"][:, None, :]
  target = jnp.zeros_like(logits).at[..., 0].set(1.0)
  bce = jnp.where(mask, jax.nn.softplus(logits) - target * logits, 0.0)
  image = jax.nn.log_softmax(out["image_logits"], axis=-1)[:, 0]
  num = jnp.sum(mask) * logits.shape[1]
  return (jnp.sum(bce) / num - jnp.mean(image)
          + jnp.mean(jnp.abs(out["pred_boxes"] - 0.5)))


def _time(fn, *args, steps):
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--image_size", type=int, default=768)
  parser.add_argument("--vocab_size", type=int, default=32_000)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--num_candidates", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--remat_policy", default="nothing_saveable")
  parser.add_argument("--attention_impl", default="xla")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  model = omnidet.OmniDet(
      variant=args.variant, image_size=args.image_size,
      vocab_size=args.vocab_size, dtype=jnp.dtype(args.dtype),
      remat=args.remat, remat_policy=args.remat_policy,
      attention_impl=args.attention_impl)
  rng = np.random.default_rng(0)
  s, b, q = args.image_size, args.batch, args.num_candidates
  images = jnp.asarray(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8))
  candidates = jnp.asarray(rng.integers(1, args.vocab_size, (b, q)), jnp.int32)

  t0 = time.perf_counter()
  params = jax.jit(lambda k: nn.unbox(model.init(
      k, images, candidates, train=False))["params"])(jax.random.key(0))
  jax.block_until_ready(params)
  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  print(f"params: {omnidet.param_counts(params)}  init {time.perf_counter() - t0:.1f}s")

  forward = jax.jit(functools.partial(model.apply, train=False))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, images, candidates):
    def loss_fn(p):
      return _stand_in_loss(model.apply({"params": p}, images, candidates,
                                        train=True))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params = jax.tree_util.tree_map(lambda p, g: p - 1e-4 * g, params, grads)
    return params, loss

  t0 = time.perf_counter()
  out = forward({"params": params}, images, candidates)
  jax.block_until_ready(out)
  print(f"forward compile+run {time.perf_counter() - t0:.1f}s; pred_logits "
        f"{out['pred_logits'].shape}, finite "
        f"{bool(jnp.all(jnp.isfinite(out['pred_logits'])))}")
  fwd_s = _time(forward, {"params": params}, images, candidates,
                steps=args.steps)
  if args.attention_impl != "xla":  # Same numbers as XLA's attention?
    ref_model = model.clone(attention_impl="xla")
    ref = jax.jit(functools.partial(ref_model.apply, train=False))(
        {"params": params}, images, candidates)
    diff = jnp.max(jnp.abs(ref["pred_logits"] - out["pred_logits"]))
    print(f"max |logit - logit with XLA attention| = {float(diff):.4f}")
  t0 = time.perf_counter()
  params, loss = step(params, images, candidates)
  jax.block_until_ready(loss)
  print(f"train step compile+run {time.perf_counter() - t0:.1f}s; loss "
        f"{float(loss):.4f}")
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    params, loss = step(params, images, candidates)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use", 0) / 2**30
  print(f"{args.variant} @{s} batch {b} {args.dtype} remat={args.remat} "
        f"attention={args.attention_impl}: "
        f"forward {fwd_s * 1e3:.1f} ms ({b / fwd_s:.1f} img/s); train step "
        f"median {np.median(times) * 1e3:.1f} ms ({b / np.median(times):.1f} "
        f"img/s); loss {float(loss):.4f}; peak memory {peak:.1f} GiB")


if __name__ == "__main__":
  main()
