"""Image decoding: a record's ``image_path`` or ``image_bytes`` -> uint8 RGB.

Only decoding lives here (resizing and cropping belong to the transforms).

Decoders, fastest first (FACTS.md: one core, 640x480 JPEG, simplejpeg + cv2
about 600 img/s, PIL about 105 img/s):

* JPEG: simplejpeg (libjpeg-turbo; also converts grayscale and CMYK to RGB).
  If it refuses the file, PIL gets a second try (exotic JPEGs), and the error of
  both is reported if that fails too. cv2 is not used for JPEG because it
  returns a silently grey-filled image for a truncated file.
* Everything else (PNG, BMP, TIFF, WebP, ...): cv2 with ``IMREAD_COLOR`` (gray,
  palette and 16-bit become 8-bit 3-channel; alpha is dropped, as PIL's
  ``convert("RGB")`` does); PIL when cv2 cannot read the format (e.g. GIF).

EXIF orientation (JPEG only, where cameras write it) is read from the APP1
segment with a small parser and applied with numpy, matching
``PIL.ImageOps.exif_transpose`` for all eight orientations.

Which orientation do the boxes refer to? The record's ``width``/``height``
decide: annotation files store the size of the image the annotator saw. If the
EXIF-rotated size matches, the rotated image is returned; if only the stored
(un-rotated) size matches -- COCO-era tools and browsers ignored EXIF, so their
boxes are in stored-pixel coordinates --, the stored orientation is returned.
This resolution is unambiguous for non-square images and is not an error. When
neither matches, `load_image` raises `DataError`; `decode_record` in lenient
mode (``strict=False``) accepts a uniformly rescaled copy of the image (same
aspect ratio within `RESCALE_ASPECT_TOLERANCE`, e.g. a dataset whose images were
re-saved smaller to save disk) and rescales the boxes with it; any other
mismatch is a `DataError` in both modes (the caller counts it as a skip when
lenient).

A ``width``/``height`` of 0 in a record means "unknown" (caption sources that
list only paths); the decoded size is then used as is.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import PIL.Image
import simplejpeg

from omnitrain_jax.data.errors import DataError

# Relative difference allowed between the x and y scale factors when a
# decoded image is accepted as a rescaled copy of the annotated one (lenient
# mode only). 1% covers rounding of the smaller side of a downscaled copy.
RESCALE_ASPECT_TOLERANCE = 0.01

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION_TAG = 0x0112


def _describe(record: Mapping[str, Any]) -> tuple[str, str]:
  """(file, record) strings for error messages."""
  source = record.get("source", "?")
  path = record.get("image_path")
  if path is None:
    path = f"<encoded image bytes of source {source!r}>"
  return str(path), f"{source} image_id {record.get('image_id', '?')}"


def _read_bytes(record: Mapping[str, Any]) -> bytes:
  """The encoded image of `record`, from ``image_bytes`` or ``image_path``."""
  data = record.get("image_bytes")
  if data is not None:
    if isinstance(data, np.ndarray):  # TFDS may hand over an object array.
      data = data.item()
    return bytes(data)
  path = record.get("image_path")
  file, rec = _describe(record)
  if not path:
    raise DataError(file, rec, "missing image: record has neither image_path "
                    "nor image_bytes", "fix the reader that produced it")
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise DataError(
        file, rec, "missing image file: it does not exist",
        "check that the reader's image_dir points at the image "
        "folder and that the file was downloaded/extracted completely, or set "
        "strict=False to skip such records") from None
  except OSError as e:
    raise DataError(file, rec, f"unreadable image file: {e}",
                    "check the file's permissions and storage") from None


def jpeg_exif_orientation(data: bytes) -> int:
  """The EXIF orientation (1..8) of an encoded JPEG; 1 when absent or broken.

  Walks the JPEG markers up to the start of scan and parses IFD0 of the first
  APP1 ``Exif`` segment. Never raises: a broken EXIF block means "no rotation".

  Args:
    data: the encoded JPEG.

  Returns:
    The orientation tag value, 1 (upright) when there is none.
  """
  n, i = len(data), 2
  while i + 4 <= n:
    if data[i] != 0xFF:
      return 1
    marker = data[i + 1]
    if marker == 0xFF:  # Fill byte.
      i += 1
      continue
    if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # Markers without a length.
      i += 2
      continue
    if marker in (0xDA, 0xD9):  # Start of scan / end of image: no EXIF.
      return 1
    (seg_len,) = struct.unpack_from(">H", data, i + 2)
    if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
      return _tiff_orientation(data[i + 10:i + 2 + seg_len])
    i += 2 + seg_len
  return 1


def _tiff_orientation(tiff: bytes) -> int:
  """The orientation tag of IFD0 of a TIFF/EXIF block; 1 when absent."""
  if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
    return 1
  e = "<" if tiff[:2] == b"II" else ">"
  (ifd,) = struct.unpack_from(e + "I", tiff, 4)
  if ifd + 2 > len(tiff):
    return 1
  (count,) = struct.unpack_from(e + "H", tiff, ifd)
  for k in range(count):
    p = ifd + 2 + 12 * k
    if p + 12 > len(tiff):
      break
    tag, typ = struct.unpack_from(e + "HH", tiff, p)
    if tag == _EXIF_ORIENTATION_TAG:
      # SHORT (3) is the standard type; LONG (4) is tolerated.
      if typ == 3:
        (value,) = struct.unpack_from(e + "H", tiff, p + 8)
      elif typ == 4:
        (value,) = struct.unpack_from(e + "I", tiff, p + 8)
      else:
        return 1
      return value if 1 <= value <= 8 else 1
  return 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
  """Applies an EXIF orientation to an [H, W, C] image (as PIL does).

  Orientations 5..8 swap height and width. The result is C-contiguous.

  Args:
    image: [H, W, C] array as stored in the file.
    orientation: EXIF orientation 1..8 (anything else means 1).

  Returns:
    The image as it is meant to be displayed.
  """
  # cv2 does these in one cache-friendly pass (a numpy view + copy of a
  # rotated 640x480 image costs several ms).
  image = np.ascontiguousarray(image)
  if orientation == 2:
    return cv2.flip(image, 1)
  if orientation == 3:
    return cv2.rotate(image, cv2.ROTATE_180)
  if orientation == 4:
    return cv2.flip(image, 0)
  if orientation == 5:
    return cv2.transpose(image)
  if orientation == 6:
    return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
  if orientation == 7:
    return cv2.transpose(cv2.rotate(image, cv2.ROTATE_180))
  if orientation == 8:
    return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
  return image


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of an encoded image as stored (before EXIF).

  Reads only the header (JPEG: simplejpeg; PNG: the IHDR chunk; others: PIL's
  lazy open), so it costs microseconds.

  Args:
    data: the encoded image.

  Returns:
    (height, width) in pixels.

  Raises:
    ValueError: the header cannot be read.
  """
  if data[:3] == _JPEG_MAGIC:
    try:
      h, w = simplejpeg.decode_jpeg_header(data)[:2]
      return int(h), int(w)
    except ValueError:
      pass  # Let PIL try.
  elif data[:8] == _PNG_MAGIC and len(data) >= 24:
    w, h = struct.unpack_from(">II", data, 16)
    return int(h), int(w)
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      w, h = im.size
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"cannot read the image header: {e}") from None
  return int(h), int(w)


def _pil_decode(data: bytes) -> np.ndarray:
  with PIL.Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def _decode_raw(data: bytes, record: Mapping[str, Any]
                ) -> tuple[np.ndarray, int]:
  """Decodes to uint8 RGB [H, W, 3] as stored, and the EXIF orientation."""
  file, rec = _describe(record)
  fix = ("re-download or re-extract the file (a partial copy is the usual "
         "cause), or set strict=False to skip such records")
  if not data:
    raise DataError(file, rec, "corrupt image: the file is empty", fix)
  if data[:3] == _JPEG_MAGIC:
    orientation = jpeg_exif_orientation(data)
    try:
      image = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as e:
      try:
        image = _pil_decode(data)
      except Exception as e2:  # PIL raises many types on bad input.
        raise DataError(file, rec, f"corrupt or truncated JPEG: {e} / {e2}",
                        fix) from None
    return image, orientation
  buf = np.frombuffer(data, np.uint8)
  # IGNORE_ORIENTATION: orientation is resolved against the record's size.
  image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is not None:
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), 1
  try:
    return _pil_decode(data), 1
  except Exception as e:  # PIL raises many types on bad input.
    raise DataError(file, rec, f"corrupt or unsupported image: {e}",
                    fix) from None


def _expected_hw(record: Mapping[str, Any]) -> tuple[int, int]:
  return int(record.get("height") or 0), int(record.get("width") or 0)


def _decode_matching(record: Mapping[str, Any]) -> np.ndarray:
  """Decodes and picks the orientation that matches the record's size.

  Returns the EXIF-oriented image when neither orientation matches (the
  callers decide whether that is an error).
  """
  raw, orientation = _decode_raw(_read_bytes(record), record)
  oriented = apply_orientation(raw, orientation)
  want = _expected_hw(record)
  if 0 in want or oriented.shape[:2] == want:
    return oriented
  if raw.shape[:2] == want:
    return raw  # Boxes were drawn on the stored pixels (EXIF ignored).
  return oriented


def _mismatch_error(record: Mapping[str, Any], image: np.ndarray,
                    lenient_note: str) -> DataError:
  file, rec = _describe(record)
  h, w = image.shape[:2]
  want_h, want_w = _expected_hw(record)
  return DataError(
      file, rec,
      f"image size mismatch: decoded {w}x{h} (width x height, after EXIF "
      f"orientation) but the annotation says {want_w}x{want_h}",
      "the image file is not the one the annotations were made on (a "
      "resized or re-encoded copy, or an EXIF rotation the annotation did not "
      f"account for); use the original images{lenient_note}")


def load_image(record: Mapping[str, Any]) -> np.ndarray:
  """Decodes a record's image to uint8 RGB [H, W, 3] in the boxes' frame.

  Args:
    record: a reader record (``image_path`` or ``image_bytes``, ``width``,
      ``height``, ``source``, ``image_id``).

  Returns:
    uint8 [H, W, 3] RGB. H, W equal the record's height/width when known.

  Raises:
    DataError: missing, unreadable, corrupt or truncated file, or a size that
      matches the record's in neither EXIF orientation.
  """
  image = _decode_matching(record)
  want = _expected_hw(record)
  if 0 not in want and image.shape[:2] != want:
    raise _mismatch_error(record, image, "")
  return image


def decode_record(record: Mapping[str, Any], *, strict: bool = True
                  ) -> dict[str, Any]:
  """A copy of `record` with ``image`` (uint8 [H, W, 3]) added.

  ``width``/``height`` are set to the decoded size (filling in 0 = unknown).
  In lenient mode a uniformly rescaled image file (same aspect ratio within
  `RESCALE_ASPECT_TOLERANCE`) is accepted and ``boxes`` are rescaled with it.

  Args:
    record: a reader record.
    strict: if True any size mismatch raises; if False a rescaled copy of the
      image is accepted (see the module docstring).

  Returns:
    A new dict; the input record is not modified.

  Raises:
    DataError: in both modes for missing/corrupt files and for size
      mismatches that are not a uniform rescale; in strict mode for every size
      mismatch. Lenient callers count the error as a skip.
  """
  image = _decode_matching(record)
  h, w = image.shape[:2]
  want_h, want_w = _expected_hw(record)
  out = dict(record)
  out["image"] = image
  out["width"], out["height"] = w, h
  if 0 in (want_h, want_w) or (h, w) == (want_h, want_w):
    return out
  sx, sy = w / want_w, h / want_h
  if strict or abs(sx - sy) > RESCALE_ASPECT_TOLERANCE * max(sx, sy):
    raise _mismatch_error(
        record, image, "" if not strict else
        " (or set strict=False to accept uniformly rescaled copies)")
  boxes = np.asarray(record["boxes"], np.float32)
  out["boxes"] = boxes * np.array([sx, sy, sx, sy], np.float32)
  return out

