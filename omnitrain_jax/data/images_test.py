"""Tests for image decoding."""

import io

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from omnitrain_jax.data import images
from omnitrain_jax.data.errors import DataError


def _smooth(h, w):
  """A smooth RGB gradient (JPEG reproduces it closely)."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                   (x + y) * 255 // max(h + w - 2, 1)], -1).astype(np.uint8)


def _encode(im, fmt, **kwargs):
  b = io.BytesIO()
  im.save(b, fmt, **kwargs)
  return b.getvalue()


def _jpeg_with_orientation(arr, orientation):
  im = PIL.Image.fromarray(arr)
  exif = PIL.Image.Exif()
  exif[0x0112] = orientation
  return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def _record(tmp_path, data, name="img.bin", width=0, height=0, **kw):
  path = tmp_path / name
  path.write_bytes(data)
  rec = {"source": "test", "image_id": 7, "image_path": str(path),
         "image_bytes": None, "width": width, "height": height,
         "boxes": np.zeros((0, 4), np.float32)}
  rec.update(kw)
  return rec


def test_jpeg_rgb_from_path_and_bytes(tmp_path):
  arr = _smooth(30, 40)
  data = _encode(PIL.Image.fromarray(arr), "JPEG", quality=95)
  rec = _record(tmp_path, data, "a.jpg", 40, 30)
  out = images.load_image(rec)
  assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
  assert np.abs(out.astype(int) - arr).mean() < 3
  from_bytes = images.load_image(
      dict(rec, image_path=None, image_bytes=data))
  np.testing.assert_array_equal(from_bytes, out)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_png_modes_become_rgb(tmp_path, mode):
  arr = _smooth(12, 16)
  if mode == "I;16":
    im = PIL.Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
  else:
    im = PIL.Image.fromarray(arr).convert(mode)
  out = images.load_image(_record(tmp_path, _encode(im, "PNG"), "a.png"))
  assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
  if mode == "I;16":
    np.testing.assert_array_equal(out[..., 0], arr[..., 0])
  else:
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


def test_grayscale_and_cmyk_jpeg(tmp_path):
  arr = _smooth(20, 24)
  gray = images.load_image(_record(
      tmp_path, _encode(PIL.Image.fromarray(arr[..., 0]), "JPEG"), "g.jpg"))
  assert gray.shape == (20, 24, 3)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  cmyk = images.load_image(_record(
      tmp_path, _encode(PIL.Image.fromarray(arr).convert("CMYK"), "JPEG",
                        quality=95), "c.jpg"))
  assert cmyk.shape == (20, 24, 3)
  assert np.abs(cmyk.astype(int) - arr).mean() < 6


def test_gif_falls_back_to_pil(tmp_path):
  arr = _smooth(10, 14)
  im = PIL.Image.fromarray(arr).convert("P")
  out = images.load_image(_record(tmp_path, _encode(im, "GIF"), "a.gif"))
  np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pil(orientation):
  arr = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
  im = PIL.Image.fromarray(arr)
  im.getexif()[0x0112] = orientation
  want = np.asarray(PIL.ImageOps.exif_transpose(im))
  got = images.apply_orientation(arr, orientation)
  np.testing.assert_array_equal(got, want)
  assert got.flags.c_contiguous


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_parser(orientation):
  data = _jpeg_with_orientation(_smooth(8, 8), orientation)
  assert images.jpeg_exif_orientation(data) == orientation


def test_exif_parser_without_or_with_broken_exif():
  plain = _encode(PIL.Image.fromarray(_smooth(8, 8)), "JPEG")
  assert images.jpeg_exif_orientation(plain) == 1
  # An APP1 "Exif" segment whose TIFF block is garbage.
  broken = plain[:2] + b"\xff\xe1\x00\x0eExif\x00\x00XXXXXX" + plain[2:]
  assert images.jpeg_exif_orientation(broken) == 1
  assert images.jpeg_exif_orientation(b"\xff\xd8\xff") == 1


def test_exif_rotation_applied_when_record_size_is_rotated(tmp_path):
  arr = _smooth(30, 40)  # Stored 40 wide, 30 high.
  data = _jpeg_with_orientation(arr, 6)
  rec = _record(tmp_path, data, "r.jpg", width=30, height=40)
  out = images.load_image(rec)
  assert out.shape == (40, 30, 3)
  # Rotated 90 degrees clockwise: the stored top-left is now top-right.
  want = np.rot90(arr, -1)
  assert np.abs(out.astype(int) - want).mean() < 3


def test_stored_orientation_kept_when_record_size_is_stored(tmp_path):
  arr = _smooth(30, 40)
  data = _jpeg_with_orientation(arr, 6)
  out = images.load_image(_record(tmp_path, data, "r.jpg", 40, 30))
  assert out.shape == (30, 40, 3)
  assert np.abs(out.astype(int) - arr).mean() < 3


def test_unknown_size_uses_exif(tmp_path):
  data = _jpeg_with_orientation(_smooth(30, 40), 8)
  out = images.load_image(_record(tmp_path, data, "r.jpg"))
  assert out.shape == (40, 30, 3)


def test_size_mismatch_raises_mentioning_exif(tmp_path):
  data = _jpeg_with_orientation(_smooth(30, 40), 6)
  rec = _record(tmp_path, data, "r.jpg", width=50, height=50)
  with pytest.raises(DataError, match="size mismatch.*EXIF") as e:
    images.load_image(rec)
  assert "r.jpg" in str(e.value) and "image_id 7" in str(e.value)
  assert "30x40" in str(e.value) and "50x50" in str(e.value)


@pytest.mark.parametrize("case", ["missing", "empty", "garbage",
                                  "truncated_jpeg", "truncated_png"])
def test_bad_files_raise_naming_path_and_record(tmp_path, case):
  arr = _smooth(30, 40)
  if case == "missing":
    rec = _record(tmp_path, b"", "gone.jpg", 40, 30)
    (tmp_path / "gone.jpg").unlink()
    pattern = "missing image file"
  elif case == "empty":
    rec, pattern = _record(tmp_path, b"", "e.jpg", 40, 30), "empty"
  elif case == "garbage":
    rec = _record(tmp_path, b"not an image at all", "x.png", 40, 30)
    pattern = "corrupt"
  elif case == "truncated_jpeg":
    data = _encode(PIL.Image.fromarray(arr), "JPEG")
    rec = _record(tmp_path, data[:len(data) // 2], "t.jpg", 40, 30)
    pattern = "truncated"
  else:
    data = _encode(PIL.Image.fromarray(arr), "PNG")
    rec = _record(tmp_path, data[:len(data) // 2], "t.png", 40, 30)
    pattern = "corrupt"
  with pytest.raises(DataError, match=pattern) as e:
    images.load_image(rec)
  assert rec["image_path"] in str(e.value)
  assert "test image_id 7" in str(e.value) and "Fix:" in str(e.value)


def test_decode_record_fills_unknown_size(tmp_path):
  data = _encode(PIL.Image.fromarray(_smooth(30, 40)), "PNG")
  rec = _record(tmp_path, data, "a.png")
  out = images.decode_record(rec)
  assert (out["width"], out["height"]) == (40, 30)
  assert out["image"].shape == (30, 40, 3)
  assert rec["width"] == 0 and "image" not in rec  # Input untouched.


def test_decode_record_rescaled_copy_strict_vs_lenient(tmp_path):
  # Annotated at 80x60, the file on disk is a 40x30 copy.
  data = _encode(PIL.Image.fromarray(_smooth(30, 40)), "PNG")
  boxes = np.array([[8, 6, 40, 30]], np.float32)
  rec = _record(tmp_path, data, "a.png", 80, 60, boxes=boxes)
  with pytest.raises(DataError, match="strict=False"):
    images.decode_record(rec, strict=True)
  out = images.decode_record(rec, strict=False)
  assert (out["width"], out["height"]) == (40, 30)
  np.testing.assert_allclose(out["boxes"], [[4, 3, 20, 15]])
  np.testing.assert_array_equal(rec["boxes"], boxes)


def test_decode_record_aspect_mismatch_raises_in_lenient_mode(tmp_path):
  data = _encode(PIL.Image.fromarray(_smooth(30, 40)), "PNG")
  rec = _record(tmp_path, data, "a.png", 40, 40)
  with pytest.raises(DataError, match="size mismatch"):
    images.decode_record(rec, strict=False)


def test_image_size_reads_headers():
  arr = _smooth(30, 40)
  for fmt in ("JPEG", "PNG", "GIF"):
    data = _encode(PIL.Image.fromarray(arr), fmt)
    assert images.image_size(data) == (30, 40), fmt
  with pytest.raises(ValueError, match="header"):
    images.image_size(b"nonsense")
