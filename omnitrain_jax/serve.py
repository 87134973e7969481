r"""An interactive page: upload an image, type queries, see the boxes.

    python -m omnitrain_jax.serve --workdir=runs/demo            # a trained run
    python -m omnitrain_jax.serve --export_dir=exported/demo      # an export
    # then open http://127.0.0.1:8080/ in a browser.

Options: ``--port`` (8080; 0 picks a free one, printed), ``--host``
(127.0.0.1; the page has no authentication, so bind another address only on
a trusted network), ``--examples=DIR`` (images offered as examples; default
the run's ShapesWorld validation images if they are in the data cache),
``--max_boxes``, ``--nms_iou``, ``--threshold`` (the slider's initial value),
``--max_upload_mb``.

The page (`PAGE`: HTML and JavaScript, no external assets, nothing fetched
from the internet) uploads or picks an image, sends comma-separated text
queries, draws the returned boxes with their scores on a canvas, filters
them with a score slider in the browser (no new request), and lets you drag
a box on the image to use that object as an image-guided query (also on
other images, until cleared; `--workdir` only, an export takes text).

The server is the standard library's `http.server`, not gradio: gradio 6.31
is a 31 MB wheel pulling 51 more packages (80 MB: fastapi, uvicorn, pandas,
huggingface_hub, ...), and its front end loads assets and fonts from the
internet, while this page must work offline, add no dependency and run in a
headless-browser test (``tests/serve_test.py``).

JSON API (what the page uses):

* ``GET /api/info``: ``{"backend", "step", "image_guided", "threshold",
  "examples": [names]}``.
* ``GET /examples/NAME``: an example image's bytes.
* ``POST /api/detect`` with a JSON body ``{"image": base64 or data URL, or
  "example": NAME, "queries": "a, b" or ["a", "b"], "query_box": [x, y, w,
  h] (optional, pixels of the query image), "query_image" / "query_example"
  (the query box's image; default the image itself)}`` returns `predict`'s
  JSON (``width``, ``height``, ``step``, ``queries``, ``detections`` with
  ``query``, ``score``, ``box_xyxy``, ``box_xywh``) for every box scoring
  above 0; errors are ``{"error": message}`` with status 400 (bad image,
  no query, bad box), 413 (body over ``--max_upload_mb``) or 500.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import json
import mimetypes
import os
import tempfile
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff")
MAX_EXAMPLES = 8


class RequestError(ValueError):
  """A bad request: answered with `status` and the message as JSON."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


# ------------------------------------------------------------------ models


class PredictorBackend:
  """A training run (`Predictor`): text and image-guided queries."""

  image_guided = True

  def __init__(self, predictor: Any, *, max_boxes: int, nms_iou: float):
    self.predictor, self.max_boxes, self.nms_iou = predictor, max_boxes, nms_iou
    self.step = predictor.step
    self.name = "workdir"

  def detect(self, image_path: str, texts: Sequence[str],
             query: tuple[str, Sequence[float]] | None) -> dict[str, Any]:
    from omnitrain_jax.data import errors  # pylint: disable=g-import-not-at-top
    try:
      image = self.predictor.load_image(image_path)
    except (errors.DataError, OSError) as e:
      raise RequestError(f"The image could not be decoded: {e}") from None
    image_queries = []
    if query is not None:
      path, box = query
      try:
        image_queries.append(self.predictor.image_query(path, box,
                                                        label="drawn box"))
      except (errors.DataError, OSError) as e:
        raise RequestError(f"The query image could not be decoded: {e}"
                           ) from None
    return self.predictor.predict(
        image, self.predictor.text_queries(texts), image_queries,
        threshold=0.0, max_boxes=self.max_boxes, nms_iou=self.nms_iou)


class ExportBackend:
  """An exported detector (`serving.load`): text queries only."""

  image_guided = False

  def __init__(self, detector: Any, *, max_boxes: int, nms_iou: float):
    self.detector, self.nms_iou = detector, nms_iou
    self.max_boxes = min(max_boxes, detector.max_boxes)
    self.step = detector.step
    self.name = "export"

  def detect(self, image_path: str, texts: Sequence[str],
             query: tuple[str, Sequence[float]] | None) -> dict[str, Any]:
    from omnitrain_jax.data import errors  # pylint: disable=g-import-not-at-top
    if query is not None:
      raise RequestError("Image-guided queries need the training run: start "
                         "the page with --workdir instead of --export_dir.")
    try:
      image = self.detector.load_image(image_path)
    except (errors.DataError, OSError) as e:
      raise RequestError(f"The image could not be decoded: {e}") from None
    return self.detector.detect([image], list(texts), top_k=self.max_boxes,
                                threshold=0.0, nms_iou=self.nms_iou)[0]


# ---------------------------------------------------------------- requests


def parse_queries(value: Any) -> list[str]:
  """``"a, b"`` or ``["a", "b"]`` -> stripped, non-empty strings."""
  if value is None:
    return []
  if isinstance(value, str):
    value = value.split(",")
  if not isinstance(value, list) or not all(isinstance(v, str)
                                            for v in value):
    raise RequestError('"queries" must be a comma-separated string or a list '
                       f"of strings, got {value!r:.100}.")
  return [v.strip() for v in value if v.strip()]


def parse_box(value: Any) -> list[float]:
  """``[x, y, w, h]`` with w, h > 0."""
  if (not isinstance(value, list) or len(value) != 4 or
      not all(isinstance(v, (int, float)) for v in value)):
    raise RequestError(f'"query_box" must be [x, y, w, h] in pixels, got '
                       f"{value!r:.100}.")
  if value[2] <= 0 or value[3] <= 0:
    raise RequestError(f'"query_box" {value}: width and height must be > 0; '
                       "drag a box over the object.")
  return [float(v) for v in value]


def decode_base64(value: Any, field: str) -> bytes:
  """A base64 string or ``data:...;base64,`` URL -> bytes."""
  if not isinstance(value, str) or not value:
    raise RequestError(f'"{field}" must be a base64 string or data URL.')
  if value.startswith("data:"):
    value = value.partition(",")[2]
  try:
    data = base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(f'"{field}" is not valid base64.') from None
  if not data:
    raise RequestError(f'"{field}" is empty.')
  return data


def list_examples(folder: str | None) -> dict[str, str]:
  """Name -> path of the first `MAX_EXAMPLES` images of a folder."""
  if not folder:
    return {}
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--examples={folder} is not a folder.")
  names = sorted(f for f in os.listdir(folder)
                 if f.lower().endswith(IMAGE_EXTENSIONS))[:MAX_EXAMPLES]
  return {n: os.path.join(folder, n) for n in names}


def default_examples(config: Any) -> str | None:
  """The ShapesWorld validation images of a run's config, if generated."""
  try:
    from omnitrain_jax.data import preparation  # pylint: disable=g-import-not-at-top
    from omnitrain_jax.data import shapes_world  # pylint: disable=g-import-not-at-top
    data = config.data if hasattr(config, "data") else config["data"]
    if data["dataset"] != "shapes_world":
      return None
    params = dict(data["shapes_world"])
    params = {k: tuple(v) if isinstance(v, list) else v
              for k, v in params.items()}
    cache = os.path.expanduser(data["cache_dir"] or
                               preparation.default_cache_dir())
    root = os.path.join(
        cache, f"shapes_world-{shapes_world.params_fingerprint(**params)}")
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    logging.info("No default examples: %s", e)
    return None
  folder = os.path.join(root, "images", "det_val")
  return folder if os.path.isdir(folder) else None


class App:
  """The page's logic, independent of HTTP (one model call at a time)."""

  def __init__(self, backend: Any, examples: dict[str, str], *,
               threshold: float = 0.1):
    self.backend, self.examples, self.threshold = backend, examples, threshold
    self._lock = threading.Lock()  # JAX calls and compile caches: serial.

  def info(self) -> dict[str, Any]:
    return {"backend": self.backend.name, "step": self.backend.step,
            "image_guided": self.backend.image_guided,
            "threshold": self.threshold, "max_boxes": self.backend.max_boxes,
            "examples": list(self.examples)}

  def _image(self, body: dict, field: str, example_field: str, tmp: str
             ) -> tuple[str, str] | None:
    """(path, name) of an uploaded or example image, None if not given."""
    if body.get(example_field) is not None:
      name = body[example_field]
      if name not in self.examples:
        raise RequestError(f'"{example_field}": no example {name!r:.100}; '
                           f"there are {list(self.examples)}.")
      return self.examples[name], name
    if body.get(field) is None:
      return None
    path = os.path.join(tmp, field)
    with open(path, "wb") as f:
      f.write(decode_base64(body[field], field))
    return path, str(body.get(f"{field}_name") or "upload")

  def detect(self, body: Any) -> dict[str, Any]:
    """``POST /api/detect`` (see the module doc)."""
    if not isinstance(body, dict):
      raise RequestError("The body must be a JSON object.")
    texts = parse_queries(body.get("queries"))
    box = body.get("query_box")
    box = None if box is None else parse_box(box)
    if not texts and box is None:
      raise RequestError("No queries: type comma-separated words (e.g. "
                         '"red circle, star") or draw a box on an image.')
    with tempfile.TemporaryDirectory(prefix="omnitrain_serve-") as tmp:
      image = self._image(body, "image", "example", tmp)
      if image is None:
        raise RequestError('No image: send "image" (base64) or "example".')
      query = None
      if box is not None:
        query_image = self._image(body, "query_image", "query_example",
                                  tmp) or image
        query = (query_image[0], box)
      with self._lock:
        result = self.backend.detect(image[0], texts, query)
    result["image"] = image[1]
    for q in result["queries"]:
      if "query_image" in q:
        q["query_image"] = query_image[1]
    return result


# -------------------------------------------------------------------- HTTP


def make_handler(app: App, max_upload_bytes: int):
  """The request handler class bound to `app`."""

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "omnitrain-serve"

    def log_message(self, fmt, *args):  # absl, not stderr.
      logging.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      self.end_headers()
      self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
      self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):  # pylint: disable=invalid-name
      path = self.path.split("?")[0]
      if path in ("/", "/index.html"):
        self._send(200, PAGE.encode(), "text/html; charset=utf-8")
      elif path == "/api/info":
        self._json(200, app.info())
      elif path.startswith("/examples/"):
        name = urllib.parse.unquote(path[len("/examples/"):])
        if name not in app.examples:  # Only listed files: no traversal.
          self._json(404, {"error": f"No example {name!r}."})
          return
        with open(app.examples[name], "rb") as f:
          data = f.read()
        self._send(200, data, mimetypes.guess_type(name)[0] or
                   "application/octet-stream")
      else:
        self._json(404, {"error": f"Not found: {path}"})

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path.split("?")[0] != "/api/detect":
        self._json(404, {"error": f"Not found: {self.path}"})
        return
      try:
        length = int(self.headers.get("Content-Length") or -1)
      except ValueError:
        length = -1
      if length < 0:
        self._json(411, {"error": "Content-Length is required."})
        return
      if length > max_upload_bytes:
        self.close_connection = True  # The body is not read.
        self._json(413, {"error": f"The request has {length} bytes, more "
                         f"than --max_upload_mb allows ({max_upload_bytes} "
                         "bytes); send a smaller image."})
        return
      try:
        try:
          body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise RequestError(f"The body is not JSON: {e}") from None
        self._json(200, app.detect(body))
      except RequestError as e:
        self._json(e.status, {"error": str(e)})
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("detect failed")
        self._json(500, {"error": f"{type(e).__name__}: {e}"})

  return Handler


def make_server(app: App, host: str = "127.0.0.1", port: int = 8080, *,
                max_upload_mb: float = 16.0
                ) -> http.server.ThreadingHTTPServer:
  """An HTTP server for `app` (``serve_forever()`` runs it)."""
  return http.server.ThreadingHTTPServer(
      (host, port), make_handler(app, int(max_upload_mb * 2**20)))


# ------------------------------------------------------------------ binary


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A training run's directory.")
  flags.DEFINE_string("export_dir", None,
                      "An export (python -m omnitrain_jax.export) instead.")
  flags.DEFINE_integer("checkpoint_step", None,
                       "Checkpoint step of --workdir (default: latest).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8080, "Port; 0 picks a free one.")
  flags.DEFINE_string("examples", None, "A folder of example images "
                      "(default: the run's ShapesWorld val images, if any).")
  flags.DEFINE_integer("max_boxes", 20, "Boxes returned per query.")
  flags.DEFINE_float("nms_iou", 0.5, "Per-query NMS IoU; 0 disables.")
  flags.DEFINE_float("threshold", 0.1, "Initial score threshold (slider).")
  flags.DEFINE_float("max_upload_mb", 16.0, "Largest request body.")


def main(argv: Sequence[str]) -> None:
  from absl import app as absl_app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from omnitrain_jax import runtime  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise absl_app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.quiet_library_logs()
  if bool(f.workdir) == bool(f.export_dir):
    raise absl_app.UsageError("Pass exactly one of --workdir and "
                              "--export_dir.")
  if f.export_dir:
    from omnitrain_jax import serving  # pylint: disable=g-import-not-at-top
    detector = serving.load(f.export_dir)
    backend = ExportBackend(detector, max_boxes=f.max_boxes,
                            nms_iou=f.nms_iou)
    config = detector.signature.get("config")
  else:
    from omnitrain_jax import config_lib  # pylint: disable=g-import-not-at-top
    from omnitrain_jax.evaluation import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.config_from_workdir(f.workdir)
    backend = PredictorBackend(
        predictor_lib.Predictor.from_workdir(f.workdir, config=config,
                                             step=f.checkpoint_step),
        max_boxes=f.max_boxes, nms_iou=f.nms_iou)
  folder = f.examples or (default_examples(config) if config else None)
  app = App(backend, list_examples(folder), threshold=f.threshold)
  if f.host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("Listening on %s: anyone who reaches it can use the "
                    "page (there is no authentication).", f.host)
  server = make_server(app, f.host, f.port, max_upload_mb=f.max_upload_mb)
  host, port = server.server_address[:2]
  # Tests read this line for the port (--port=0).
  print(f"Serving on http://{host}:{port}/ ({len(app.examples)} examples "
        f"from {folder}); Ctrl-C stops.", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>omnitrain_jax detector</title>
<link rel="icon" href="data:,">
<style>
 body{font-family:sans-serif;margin:16px;color:#222;max-width:1160px}
 h1{font-size:20px;margin:0 0 8px}
 .row{display:flex;gap:16px;align-items:flex-start}
 .panel{display:flex;flex-direction:column;gap:8px}
 .controls{width:420px;flex:none}
 .view{flex:1;min-width:0;align-items:flex-start}
 canvas{border:1px solid #888;cursor:crosshair;max-width:100%}
 #detections{max-height:320px;overflow-y:auto}
 #examples img{width:56px;height:56px;object-fit:cover;border:2px solid #ccc;
  cursor:pointer;margin-right:4px} #examples img.sel{border-color:#d33}
 #error{color:#b00;white-space:pre-wrap} #status{color:#555}
 #detections{font-family:monospace;font-size:13px;padding-left:32px;margin:0}
 pre{background:#f4f4f4;max-height:200px;overflow:auto;font-size:11px}
 label{font-size:14px}
</style></head><body>
<h1>omnitrain_jax: open-vocabulary detection</h1>
<div id="status">Loading...</div>
<div class="row"><div class="panel controls">
 <label>Image: <input type="file" id="file" accept="image/*"></label>
 <div id="examples"></div>
 <label>Queries (comma-separated):
  <input type="text" id="queries" size="36" value="red circle, star"></label>
 <div id="query-box-info">Drag a box on the image to use that object as an
  image-guided query.</div>
 <div><button id="detect">Detect</button>
  <button id="clear-box" disabled>Clear drawn box</button></div>
 <label>Score threshold: <input type="range" id="threshold" min="0" max="1"
  step="0.01" value="0.1"> <span id="threshold-value">0.10</span></label>
 <div><span id="box-count">0</span> boxes shown of
  <span id="box-total">0</span></div>
 <ol id="detections"></ol>
 <div id="error"></div>
</div><div class="panel view">
 <canvas id="canvas" width="512" height="384"></canvas>
 <details><summary>Result JSON</summary><pre id="result-json"></pre></details>
</div></div>
<script>
"use strict";
const $ = id => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
const COLORS = ["#e6194b","#3cb44b","#4363d8","#f58231","#911eb4","#42d4f4",
                "#f032e6","#808000","#000075","#9a6324"];
let info = {image_guided: false, examples: []};
let current = null;   // {img, source: {example} | {image, image_name}}
let queryBox = null;  // {box: [x,y,w,h], source, name}
let drag = null, result = null, scale = 1;

function setError(msg) { $("error").textContent = msg || ""; }
function setStatus(msg) { $("status").textContent = msg; }

async function init() {
  try {
    info = await (await fetch("/api/info")).json();
  } catch (e) { setError("Cannot reach the server: " + e); return; }
  $("threshold").value = info.threshold;
  $("threshold-value").textContent = Number(info.threshold).toFixed(2);
  setStatus("Model: " + info.backend + ", step " + info.step +
            (info.image_guided ? "" : " (text queries only)"));
  if (!info.image_guided) $("query-box-info").textContent =
      "Image-guided queries need --workdir.";
  for (const name of info.examples) {
    const im = document.createElement("img");
    im.src = "/examples/" + encodeURIComponent(name); im.title = name;
    im.className = "example"; im.dataset.name = name;
    im.onclick = () => pickExample(name, im);
    $("examples").appendChild(im);
  }
}

function loadImage(src) {
  return new Promise((ok, bad) => {
    const img = new Image();
    img.onload = () => ok(img);
    img.onerror = () => bad(new Error("the browser cannot show this image"));
    img.src = src;
  });
}

async function pickExample(name, el) {
  document.querySelectorAll("#examples img").forEach(
      i => i.classList.toggle("sel", i === el));
  try {
    current = {img: await loadImage("/examples/" + encodeURIComponent(name)),
               source: {example: name}, name: name};
  } catch (e) { setError(String(e)); return; }
  result = null; render();
}

$("file").onchange = () => {
  const file = $("file").files[0];
  if (!file) return;
  document.querySelectorAll("#examples img").forEach(
      i => i.classList.remove("sel"));
  const reader = new FileReader();
  reader.onload = async () => {
    let img = null;
    try { img = await loadImage(reader.result); } catch (e) {}
    // Undecodable in the browser: still sent, the server explains.
    current = {img: img, source: {image: reader.result,
               image_name: file.name}, name: file.name};
    result = null; render();
  };
  reader.readAsDataURL(file);
};

function render() {
  const img = current && current.img;
  if (img) {
    // Small images are drawn enlarged so boxes and labels stay legible.
    scale = Math.max(1, Math.floor(480 / Math.max(img.width, img.height)));
    scale = Math.min(scale, 640 / img.width) || 1;
    canvas.width = Math.round(img.width * scale);
    canvas.height = Math.round(img.height * scale);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  } else {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
  }
  const t = Number($("threshold").value);
  $("threshold-value").textContent = t.toFixed(2);
  const list = $("detections"); list.innerHTML = "";
  const dets = result ? result.detections : [];
  const shown = dets.filter(d => d.score >= t);
  ctx.lineWidth = 2; ctx.font = "bold 13px sans-serif";
  // Best last, so its box and label are on top.
  for (const d of img ? shown.slice().reverse() : []) {
    const color = COLORS[d.query_index % COLORS.length];
    const [x, y, w, h] = d.box_xywh.map(v => v * scale);
    ctx.strokeStyle = color; ctx.strokeRect(x, y, w, h);
    const label = d.query + " " + d.score.toFixed(2);
    const tw = ctx.measureText(label).width + 6;
    const ly = y >= 16 ? y - 16 : y;
    ctx.fillStyle = color; ctx.fillRect(x, ly, tw, 16);
    ctx.fillStyle = "#fff"; ctx.fillText(label, x + 3, ly + 12);
  }
  for (const d of shown) {
    const color = COLORS[d.query_index % COLORS.length];
    const li = document.createElement("li");
    li.className = "detection"; li.style.color = color;
    li.textContent = d.query + "  " + d.score.toFixed(3) + "  [" +
        d.box_xywh.map(v => v.toFixed(1)).join(", ") + "]";
    list.appendChild(li);
  }
  $("box-count").textContent = shown.length;
  $("box-total").textContent = dets.length;
  canvas.dataset.drawn = img ? shown.length : 0;
  const qb = queryBox && current && queryBox.name === current.name &&
      queryBox.box;
  const box = drag ? drag.box : qb;
  if (box) {
    ctx.setLineDash([6, 4]); ctx.strokeStyle = "#ff0";
    ctx.strokeRect(box[0] * scale, box[1] * scale, box[2] * scale,
                   box[3] * scale);
    ctx.setLineDash([]);
  }
}

$("threshold").oninput = render;  // Client-side: no new request.

function imageXY(ev) {
  const r = canvas.getBoundingClientRect();
  const k = canvas.width / r.width / scale;
  const img = current.img;
  return [Math.min(Math.max((ev.clientX - r.left) * k, 0), img.width),
          Math.min(Math.max((ev.clientY - r.top) * k, 0), img.height)];
}
canvas.onmousedown = ev => {
  if (!info.image_guided || !current || !current.img) return;
  const [x, y] = imageXY(ev);
  drag = {x0: x, y0: y, box: [x, y, 0, 0]};
};
canvas.onmousemove = ev => {
  if (!drag) return;
  const [x, y] = imageXY(ev);
  drag.box = [Math.min(x, drag.x0), Math.min(y, drag.y0),
              Math.abs(x - drag.x0), Math.abs(y - drag.y0)];
  render();
};
window.addEventListener("mouseup", () => {
  if (!drag) return;
  const box = drag.box.map(v => Math.round(v * 10) / 10); drag = null;
  if (box[2] >= 2 && box[3] >= 2) {
    queryBox = {box: box, source: current.source, name: current.name};
    $("query-box-info").textContent = "Image query: box [" + box.join(", ") +
        "] of " + current.name + " (used on every image until cleared)";
    $("clear-box").disabled = false;
  }
  render();
});
$("clear-box").onclick = () => {
  queryBox = null; $("clear-box").disabled = true;
  $("query-box-info").textContent = "Drag a box on the image to use that " +
      "object as an image-guided query.";
  render();
};

$("detect").onclick = async () => {
  setError("");
  if (!current) { setError("Pick an example or upload an image first."); return; }
  const body = Object.assign({queries: $("queries").value}, current.source);
  if (queryBox) {
    body.query_box = queryBox.box;
    if (queryBox.source.example !== undefined)
      body.query_example = queryBox.source.example;
    else body.query_image = queryBox.source.image;
  }
  $("detect").disabled = true; setStatus("Detecting...");
  const t0 = performance.now();
  try {
    const resp = await fetch("/api/detect", {method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify(body)});
    const data = await resp.json();
    if (!resp.ok) { setError(data.error || resp.statusText); setStatus(""); }
    else {
      result = data;
      $("result-json").textContent = JSON.stringify(data, null, 1);
      setStatus(data.detections.length + " boxes in " +
                Math.round(performance.now() - t0) + " ms (step " +
                data.step + ")");
      render();
    }
  } catch (e) { setError("Request failed: " + e); setStatus(""); }
  $("detect").disabled = false;
};

init();
</script></body></html>
"""


if __name__ == "__main__":
  from absl import app as _absl_app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _absl_app.run(main)
