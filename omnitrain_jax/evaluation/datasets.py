"""Which datasets an evaluation scores: a config's val files, or any COCO file.

* `eval_datasets`: every det and grd source of the config with a ``val``
  file (or those named in ``eval.datasets``), each with its protocol: det
  ``coco`` (``lvis`` for the LVIS reader), grd ``refexp`` (RefCOCO-style
  Acc@0.5) or ``flickr`` (Recall@k) for sources whose name or file mentions
  "flickr"; ``eval.protocols`` overrides the guess. ShapesWorld det sources
  also report AP per open-vocabulary group (``splits.json``).
* `with_dataset_json`: a COCO or LVIS instances file as an extra det source,
  its category names the queries (``evaluate --dataset_json``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from omnitrain_jax.data import formats
from omnitrain_jax.data import preparation
from omnitrain_jax.data import sources as sources_lib
from omnitrain_jax.evaluation import options as options_lib


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """One evaluation: a source's val split and how to score it.

  Attributes:
    name: the metrics' prefix ``eval/<name>/`` and the files' suffix.
    stream: ``det`` or ``grd``.
    source: the source name in ``info.sources[stream]``.
    protocol: one of `options.PROTOCOLS`.
    category_groups: det: group -> category ids, for ``AP_<group>``.
  """
  name: str
  stream: str
  source: str
  protocol: str
  category_groups: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict)


def _guess_protocol(spec: sources_lib.SourceSpec) -> str:
  if spec.stream == "det":
    return "lvis" if spec.reader == "lvis" else "coco"
  text = f"{spec.name} {os.path.basename(spec.val)}".lower()
  return "flickr" if "flickr" in text else "refexp"


def _under(path: str, folder: str) -> bool:
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return os.path.commonpath([path, folder]) == folder


def _shapes_groups(info: preparation.DataInfo) -> dict[str, tuple[int, ...]]:
  splits = info.splits or {}
  groups = {}
  for group in ("base", "grd_novel", "img_novel"):
    if f"{group}_categories" in splits:
      groups[group] = tuple(int(c) for c in splits[f"{group}_categories"])
  return groups


def eval_datasets(config: Any, info: preparation.DataInfo,
                  options: options_lib.EvalOptions | None = None
                  ) -> list[EvalDataset]:
  """The datasets an evaluation of `config` scores (see the module doc)."""
  options = options or options_lib.EvalOptions.from_config(config)
  out = []
  for stream in ("det", "grd"):
    for name, spec in info.sources.get(stream, {}).items():
      if not spec.val or (options.datasets and name not in options.datasets):
        continue
      protocol = options.protocols.get(name) or _guess_protocol(spec)
      wanted = (options_lib.DET_PROTOCOLS if stream == "det"
                else options_lib.GRD_PROTOCOLS)
      if protocol not in wanted:
        raise ValueError(f"eval.protocols[{name!r}]={protocol!r} does not fit "
                         f"a {stream} source; use one of {wanted}.")
      groups = {}
      if (stream == "det" and info.splits is not None
          and spec.reader == "coco_instances" and _under(spec.val, info.root)):
        # ShapesWorld's own files only (not a user's file beside them).
        groups = _shapes_groups(info)
      out.append(EvalDataset(name=name, stream=stream, source=name,
                             protocol=protocol, category_groups=groups))
  known = {d.name for d in out}
  missing = [n for n in options.datasets if n not in known]
  if missing:
    have = sorted(n for s in ("det", "grd")
                  for n, spec in info.sources.get(s, {}).items() if spec.val)
    raise ValueError(f"eval.datasets names {missing}, which are not det/grd "
                     f"sources with a val file; those are {have}.")
  return out


def with_dataset_json(info: preparation.DataInfo, json_path: str,
                      image_dir: str, *, name: str | None = None,
                      fmt: str = "auto"
                      ) -> tuple[preparation.DataInfo, EvalDataset]:
  """Adds a COCO/LVIS file as a det source (val split) to `info`.

  Args:
    info: the run's data info (its vocabulary tokenizes the names).
    json_path: a COCO or LVIS instances file.
    image_dir: the folder its ``file_name``s (LVIS: ``coco_url`` tails) are
      relative to.
    name: the dataset's name (default: the file's stem).
    fmt: ``coco``, ``lvis``, or ``auto`` (`data.formats.sniff_format`:
      LVIS when images carry ``neg_category_ids`` or categories carry
      ``synonyms`` / ``frequency``).

  Returns:
    (the extended info, the dataset to evaluate).
  """
  json_path = os.path.abspath(os.path.expanduser(json_path))
  image_dir = os.path.abspath(os.path.expanduser(image_dir))
  if not os.path.exists(json_path):
    raise FileNotFoundError(f"--dataset_json={json_path} does not exist.")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"--image_dir={image_dir} is not a folder.")
  if fmt == "auto":
    sniffed = formats.sniff_format(json_path)  # The readers' own rules.
    if sniffed not in ("coco_instances", "lvis"):
      raise ValueError(f"--dataset_json={json_path} is a {sniffed} file, not "
                       "COCO or LVIS instances (boxes with categories).")
    fmt = "lvis" if sniffed == "lvis" else "coco"
  if fmt not in ("coco", "lvis"):
    raise ValueError(f"dataset format {fmt!r}; use auto, coco or lvis.")
  name = name or os.path.splitext(os.path.basename(json_path))[0]
  spec = sources_lib.SourceSpec(
      name=name, stream="det",
      reader="lvis" if fmt == "lvis" else "coco_instances",
      train=json_path, val=json_path, image_dir=image_dir)
  sources = {s: dict(v) for s, v in info.sources.items()}
  sources.setdefault("det", {})[name] = spec
  return (dataclasses.replace(info, sources=sources),
          EvalDataset(name=name, stream="det", source=name, protocol=fmt))
