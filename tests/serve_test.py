"""The interactive page (`omnitrain_jax.serve`) on a tiny trained run.

The server runs as a subprocess on a free port (``--port=0``); its JSON API
is checked over HTTP, and the page itself in Debian's headless chromium
driven by selenium with the system chromedriver (no download: selenium
manager is skipped when the driver's path is given). Without chromium the
browser test fails and says how to install it (``.ci/install_browser.sh``).
"""

import base64
import contextlib
import http.client
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
import pytest

import binaries  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = ("run `sudo .ci/install_browser.sh` (Debian/Ubuntu: apt-get "
           "install -y chromium chromium-driver)")
HTTP_TIMEOUT = 120  # One request (the first one compiles).


_env = binaries.subprocess_env


@contextlib.contextmanager
def _serving(args, logs):
  """Runs ``serve ARGS --port=0``; yields its base URL once it listens."""
  out, err = logs / "stdout.txt", logs / "stderr.txt"
  with open(out, "w") as fo, open(err, "w") as fe:
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnitrain_jax.serve", *args, "--port=0"],
        env=_env(), stdout=fo, stderr=fe, cwd=str(REPO))
  try:
    deadline = time.time() + 300
    url = None
    while url is None:
      match = re.search(r"Serving on (http://\S+/)", out.read_text())
      if match:
        url = match.group(1)
      elif proc.poll() is not None:
        pytest.fail(f"serve exited ({proc.returncode}):\n"
                    f"{err.read_text()[-4000:]}")
      elif time.time() > deadline:
        pytest.fail(f"serve did not start in 300 s:\n"
                    f"{err.read_text()[-4000:]}")
      else:
        time.sleep(0.2)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
  """The page's base URL, served from the run (default examples)."""
  workdir, _ = tiny_run
  with _serving([f"--workdir={workdir}", "--max_upload_mb=1"],
                tmp_path_factory.mktemp("server_logs")) as url:
    yield url


@pytest.fixture(scope="module")
def export_server(tiny_run, tmp_path_factory):
  """The page of the run's CPU export (`omnitrain_jax.export`)."""
  workdir, _ = tiny_run
  out = str(tmp_path_factory.mktemp("export") / "detector")
  proc = subprocess.run(
      [sys.executable, "-m", "omnitrain_jax.export", f"--workdir={workdir}",
       f"--out={out}", "--platforms=cpu"], env=_env(), capture_output=True,
      text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  with _serving([f"--export_dir={out}"],
                tmp_path_factory.mktemp("export_server_logs")) as url:
    yield url


def _get(url):
  with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
    return r.status, r.headers.get("Content-Type"), r.read()


def _post(url, body):
  """(status, JSON) of a POST /api/detect."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(url + "api/detect", data=data,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _png_b64(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _check_result(result, width, height):
  assert (result["width"], result["height"]) == (width, height)
  dets = result["detections"]
  assert dets, result
  scores = [d["score"] for d in dets]
  assert scores == sorted(scores, reverse=True) and min(scores) > 0
  for d in dets:
    x0, y0, x1, y1 = d["box_xyxy"]
    assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, d


def test_list_examples(tmp_path):
  from omnitrain_jax import serve  # pylint: disable=g-import-not-at-top
  for name in ("b.png", "a.JPG", "notes.txt", *(f"{i}.jpg" for i in range(9))):
    (tmp_path / name).write_bytes(b"")
  examples = serve.list_examples(str(tmp_path))
  assert len(examples) == serve.MAX_EXAMPLES and "notes.txt" not in examples
  assert list(examples)[:2] == ["0.jpg", "1.jpg"]
  assert serve.list_examples(None) == {}
  with pytest.raises(FileNotFoundError, match="--examples"):
    serve.list_examples(str(tmp_path / "missing"))


# -------------------------------------------------------------- HTTP API


def test_page_and_info(server):
  status, ctype, page = _get(server)
  assert status == 200 and ctype.startswith("text/html")
  # Nothing is fetched from another host: no absolute URLs at all.
  assert not re.search(rb"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page)
  _, _, body = _get(server + "api/info")
  info = json.loads(body)
  assert info["backend"] == "workdir" and info["image_guided"]
  assert info["step"] == binaries.REFERENCE_STEPS
  # The run's ShapesWorld val images are the default examples.
  assert info["examples"] and info["examples"][0].endswith(".jpg")
  status, ctype, data = _get(server + "examples/" + info["examples"][0])
  assert status == 200 and ctype == "image/jpeg"
  assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_detect_example_and_upload(server):
  name = json.loads(_get(server + "api/info")[2])["examples"][0]
  status, result = _post(server, {"example": name,
                                  "queries": "red circle, star"})
  assert status == 200, result
  _check_result(result, 64, 64)
  assert result["image"] == name
  assert [q["query"] for q in result["queries"]] == ["red circle", "star"]
  # An upload of another size and kind (grayscale PNG), queries as a list.
  gray = np.random.default_rng(0).integers(0, 255, (50, 120), np.uint8)
  status, result = _post(server, {"image": _png_b64(gray),
                                  "image_name": "gray.png",
                                  "queries": ["blue square"]})
  assert status == 200, result
  _check_result(result, 120, 50)
  assert result["image"] == "gray.png"


def test_detect_image_guided(server):
  name = json.loads(_get(server + "api/info")[2])["examples"][0]
  rgb = np.random.default_rng(1).integers(0, 255, (40, 80, 3), np.uint8)
  status, result = _post(server, {"image": _png_b64(rgb), "queries": "",
                                  "query_example": name,
                                  "query_box": [10, 10, 20, 20]})
  assert status == 200, result
  _check_result(result, 80, 40)
  (query,) = result["queries"]
  assert query["query"] == "drawn box" and query["query_image"] == name
  assert query["query_box_xywh"] == [10, 10, 20, 20]
  assert {d["query"] for d in result["detections"]} == {"drawn box"}


@pytest.mark.parametrize("body, status, message", [
    ({"example": None, "image": base64.b64encode(b"not an image").decode(),
      "queries": "star"}, 400, "could not be decoded"),
    ({"image": "@@@", "queries": "star"}, 400, "not valid base64"),
    ({"queries": "star"}, 400, "No image"),
    ({"example": "../../etc/passwd", "queries": "star"}, 400, "no example"),
    ({"example": "000000.jpg", "queries": " , "}, 400, "No queries"),
    ({"example": "000000.jpg", "queries": "star", "query_box": [1, 2, 0, 4]},
     400, "width and height"),
    ({"example": "000000.jpg", "queries": 3}, 400, "comma-separated"),
    (b"{not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests(server, body, status, message):
  got, result = _post(server, body)
  assert got == status and message in result["error"], result


def test_upload_limit_and_paths(server):
  host, port = re.match(r"http://([^:/]+):(\d+)/", server).groups()
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  try:
    # The headers announce 2 MB (--max_upload_mb=1): refused before the body.
    conn.putrequest("POST", "/api/detect")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 * 2**20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert "--max_upload_mb" in json.loads(resp.read())["error"]
  finally:
    conn.close()
  for path in ("examples/..%2F..%2Fconfig.json", "nothing"):
    with pytest.raises(urllib.error.HTTPError) as e:
      _get(server + path)
    assert e.value.code == 404


def test_export_dir(export_server, server):
  info = json.loads(_get(export_server + "api/info")[2])
  assert info["backend"] == "export" and not info["image_guided"]
  assert info["step"] == binaries.REFERENCE_STEPS and info["examples"]
  body = {"example": info["examples"][0], "queries": "red circle, star"}
  status, result = _post(export_server, body)
  assert status == 200, result
  _check_result(result, 64, 64)
  # The same boxes and scores as the run's page.
  _, want = _post(server, body)
  assert len(result["detections"]) == len(want["detections"])
  for got, ref in zip(result["detections"], want["detections"]):
    assert got["query"] == ref["query"]
    np.testing.assert_allclose(got["score"], ref["score"], atol=2e-4)
    np.testing.assert_allclose(got["box_xyxy"], ref["box_xyxy"], atol=0.05)
  status, result = _post(export_server, dict(body, query_box=[1, 1, 9, 9]))
  assert status == 400 and "--workdir" in result["error"], result


# --------------------------------------------------------------- browser


def _driver(tmp_path):
  """Headless chromium through the system chromedriver (no downloads)."""
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
  if missing:
    pytest.fail(f"The browser test needs {' and '.join(missing)}, not found: "
                f"{INSTALL}.")
  try:
    from selenium import webdriver  # pylint: disable=g-import-not-at-top
    from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.fail("The browser test needs selenium: pip install -e '.[test]'.")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--disable-gpu", "--window-size=1200,900",
              "--no-first-run", "--disable-extensions",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
    options.add_argument(arg)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  service = Service(executable_path=CHROMEDRIVER,
                    log_output=str(tmp_path / "chromedriver.log"))
  return webdriver.Chrome(service=service, options=options)


def _wait_for_result(driver, previous_json, timeout=HTTP_TIMEOUT):
  """The parsed result JSON once the page shows a new one (bounded)."""
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top

  def ready(d):
    error = d.find_element("id", "error").text
    if error:
      return error
    text = d.execute_script(
        "return document.getElementById('result-json').textContent")
    return text if text and text != previous_json else False

  got = WebDriverWait(driver, timeout, poll_frequency=0.2).until(ready)
  assert got.startswith("{"), f"The page shows an error: {got}"
  return got, json.loads(got)


def _shown(driver):
  count = int(driver.find_element("id", "box-count").text)
  items = driver.find_elements("css selector", "#detections li.detection")
  drawn = int(driver.find_element("id", "canvas").get_attribute(
      "data-drawn"))
  assert count == len(items) == drawn, (count, len(items), drawn)
  return count


def test_page_in_headless_chromium(server, tiny_run, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  _, data_root = tiny_run
  image = tmp_path / "shapes.jpg"
  image.write_bytes((data_root / "images" / "det_val" / "000001.jpg"
                     ).read_bytes())
  start = time.time()
  driver = _driver(tmp_path)
  try:
    driver.set_page_load_timeout(60)
    driver.get(server)
    WebDriverWait(driver, 30).until(
        lambda d: d.find_elements("css selector", "#examples img.example"))
    assert f"step {binaries.REFERENCE_STEPS}" in driver.find_element("id", "status").text
    # The image sits beside the controls, not below them.
    assert driver.find_element("id", "canvas").location["x"] > 400

    # Upload an image and ask for two queries.
    driver.find_element("id", "file").send_keys(str(image))
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.getElementById('canvas').width") == 448)
    queries = driver.find_element("id", "queries")
    queries.clear()
    queries.send_keys("red circle, blue star")
    driver.find_element("id", "detect").click()
    text, result = _wait_for_result(driver, "")
    assert result["image"] == "shapes.jpg" and result["width"] == 64
    total = len(result["detections"])
    assert total > 1 and int(driver.find_element("id", "box-total").text
                             ) == total
    scores = sorted({d["score"] for d in result["detections"]})
    assert len(scores) > 1, scores
    # Threshold to 0 then between the scores: fewer boxes, no new request.
    slider = driver.find_element("id", "threshold")
    driver.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('input'));", slider, 0)
    assert _shown(driver) == total
    threshold = round((scores[0] + scores[-1]) / 2, 2)
    threshold = min(max(threshold, scores[0] + 0.01), scores[-1])
    driver.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('input'));", slider, threshold)
    value = float(slider.get_attribute("value"))
    expected = sum(d["score"] >= value for d in result["detections"])
    assert 0 < _shown(driver) == expected < total, (value, scores)
    driver.save_screenshot(str(tmp_path / "page_text_queries.png"))

    # Drag a box over the middle of the image: an image-guided query.
    canvas = driver.find_element("id", "canvas")
    ActionChains(driver).move_to_element_with_offset(canvas, -80, -80) \
        .click_and_hold().move_by_offset(100, 100).release().perform()
    assert "Image query" in driver.find_element("id", "query-box-info").text
    driver.execute_script(
        "arguments[0].value = 0; arguments[0].dispatchEvent("
        "new Event('input'));", slider)
    driver.find_element("id", "detect").click()
    _, guided = _wait_for_result(driver, text)
    labels = [q["query"] for q in guided["queries"]]
    assert labels == ["red circle", "blue star", "drawn box"], labels
    box = guided["queries"][2]["query_box_xywh"]
    assert all(b > 0 for b in box) and 10 < box[2] < 20, box  # 100 / 7 px.
    assert any(d["query"] == "drawn box" for d in guided["detections"])
    assert _shown(driver) == len(guided["detections"])
    assert driver.find_element("id", "canvas").location["y"] < 150
    driver.save_screenshot(str(tmp_path / "page_image_query.png"))
    errors = [e for e in driver.get_log("browser")
              if e["level"] == "SEVERE"]
    assert not errors, errors
  finally:
    driver.quit()
  print(f"browser test: {time.time() - start:.1f} s; screenshots in "
        f"{tmp_path}")
