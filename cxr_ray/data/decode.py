"""Decode one X-ray file into 8-bit grey pixels at the training resolution, or say why not.

Pure PIL/numpy/pyarrow (no Ray): :func:`decode_batch` is what ``cxr-ray prepare`` runs
inside Ray Data's ``map_batches``, and it is testable on its own.

Rules (the same for every file, whatever its format):

* **Never raise for a bad file.**  Every row comes back either with pixels or with a
  reason, so the caller can count ``written + quarantined == rows`` by construction.
  Reasons start with a fixed kind, then a short detail after ``": "``:
  ``missing file``, ``empty file``, ``not an image``, ``truncated image`` (including a
  PNG/JPEG/TIFF whose header is cut short), ``corrupt image`` (identified but fails to
  decode for another reason), ``unsupported image`` (e.g. a float image), and
  ``unreadable file`` (a directory, no permission).
* **Grey levels.** 8-bit grey (``L``) is kept as is.  Colour and palette images go
  through PIL's ``convert("L")``, the ITU-R 601-2 luma ``L = (299 R + 587 G + 114 B) /
  1000``.  **Alpha is dropped**, not composited: X-ray files saved as RGBA/LA carry an
  opaque alpha channel, and compositing onto black or white would change pixel values
  by an arbitrary choice of background.  16-bit images (``I;16*``) are **scaled** by
  their bit depth, ``v · 255 / 65535`` (PIL's own ``convert("L")`` would clip them at
  255, turning most of the image white); 32-bit integer images (``I``) are treated as
  16-bit when their values fit in 0..65535 (that is what 16-bit PNGs decode to in older
  PIL), else scaled by ``2**32 - 1``.  Scaled images are resized in float and rounded
  once, so no precision is lost twice.
* **Size.** Every image is resized to ``size × size`` with PIL's bilinear filter and
  ``reducing_gap=None``: for a downscale PIL widens the triangle filter to the scale
  factor, i.e. a true antialiased resize, the same kind torchvision's
  ``Resize(antialias=True)`` does (PIL-compatible).  ``BOX`` was as fast but blockier;
  ``LANCZOS`` about 1.5× slower for no gain at these factors.  **Non-square images are
  stretched** to a square, as Keras' ``load_img(target_size=...)`` (the study's loader)
  does; NIH images are all square, so this only concerns strays, which the manifest
  counts.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

#: Reason kinds, in the order the manifest lists them.
MISSING = "missing file"
EMPTY = "empty file"
NOT_IMAGE = "not an image"
TRUNCATED = "truncated image"
CORRUPT = "corrupt image"
UNSUPPORTED = "unsupported image"
UNREADABLE = "unreadable file"
REASON_KINDS: tuple[str, ...] = (MISSING, EMPTY, NOT_IMAGE, TRUNCATED, CORRUPT, UNSUPPORTED,
                                 UNREADABLE)

#: Resize filter (see the module docstring).
RESAMPLE = Image.BILINEAR
RESAMPLE_NAME = "PIL bilinear, reducing_gap=None (antialiased)"

#: File signatures of the formats NIH-like data comes in: a file that starts like one of
#: these but cannot be identified was cut short (its header is incomplete).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")

_NIH_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")
#: Ids derived from names that do not follow the NIH pattern live in [2**62, 2**63):
#: disjoint from NIH ids (patient · 1000 + follow-up < 10**11).
_HASHED_ID_BIT = 1 << 62


def image_id(name: str) -> int:
    """Integer id of an image: ``PPPPPPPP_FFF.png`` → ``patient · 1000 + follow-up``.

    Other names get a stable 62-bit BLAKE2b hash with bit 62 set, so they can never
    collide with an NIH-pattern id (callers still check the whole set for duplicates).
    """
    m = _NIH_NAME.match(name)
    if m:
        return int(m.group(1)) * 1000 + int(m.group(2))
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (_HASHED_ID_BIT - 1)) | _HASHED_ID_BIT


class Quarantine(Exception):
    """A file that cannot be used; ``str(exc)`` is the ``kind: detail`` reason."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray
    """uint8 (size, size)."""
    mode: str
    """PIL mode of the source file (``L``, ``RGB``, ``RGBA``, ``I;16``, ...)."""
    width: int
    height: int


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r" <_io\.\w+ object at 0x[0-9a-f]+>| '[^']*'$", "", text)
    return f"{type(exc).__name__}: {text}"[:160] if text else type(exc).__name__


def check_file(path: str) -> os.stat_result:
    """The file's stat, or :class:`Quarantine` for a missing, unreadable, non-regular or
    empty one."""
    if not path:
        raise Quarantine(MISSING, "not found under the data directory")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Quarantine(MISSING, "not found under the data directory") from None
    except OSError as exc:
        raise Quarantine(UNREADABLE, _short(exc)) from None
    if not os.path.isfile(path):
        raise Quarantine(UNREADABLE, "not a regular file")
    if st.st_size == 0:
        raise Quarantine(EMPTY, "0 bytes")
    return st


def _open(path: str) -> Image.Image:
    st = check_file(path)
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if len(head) >= 2 and any(head[: len(sig)] == sig[: len(head)] for sig in _SIGNATURES):
            raise Quarantine(TRUNCATED, f"header cut short ({st.st_size} bytes)") from None
        raise Quarantine(NOT_IMAGE, f"unrecognised format, starts with {head[:8]!r}") from None
    except FileNotFoundError:  # deleted since the stat
        raise Quarantine(MISSING, "vanished while reading") from None
    except Image.DecompressionBombError as exc:
        raise Quarantine(UNSUPPORTED, _short(exc)) from None
    except (OSError, EOFError, SyntaxError, ValueError) as exc:
        raise _decode_error(exc) from None
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not lose the row either
        im.close()
        raise _decode_error(exc) from None
    return im


def _decode_error(exc: BaseException) -> Quarantine:
    """PIL's error for a file it identified but could not decode: cut short, or corrupt."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or "end of file" in text:
        return Quarantine(TRUNCATED, _short(exc))
    return Quarantine(CORRUPT, _short(exc))


def to_gray(im: Image.Image) -> tuple[Image.Image, bool]:
    """The grey image to resize and whether it is float (``F``, values in [0, 255])."""
    mode = im.mode
    if mode == "L":
        return im, False
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(im)
        if mode == "I":
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            bits = 16 if lo >= 0 and hi <= 0xFFFF else 32
            arr = np.clip(arr, 0, None)
        else:
            bits = 16
        scaled = arr.astype(np.float64) * (255.0 / float((1 << bits) - 1))
        return Image.fromarray(scaled.astype(np.float32), mode="F"), True
    if mode == "F":
        raise Quarantine(UNSUPPORTED, "floating-point pixels (mode F) have no bit depth")
    try:
        return im.convert("L"), False  # RGB, RGBA (alpha dropped), LA, P, 1, CMYK, YCbCr ...
    except (ValueError, OSError) as exc:
        raise Quarantine(UNSUPPORTED, f"mode {mode}: {_short(exc)}") from None


def resize_gray(gray: Image.Image, is_float: bool, size: int) -> np.ndarray:
    """Antialiased resize to ``size × size`` → uint8 array."""
    if gray.size != (size, size):
        gray = gray.resize((size, size), RESAMPLE, reducing_gap=None)
    arr = np.asarray(gray)
    if is_float:
        arr = np.clip(np.rint(arr), 0, 255)
    return arr.astype(np.uint8, copy=False)


def decode_image(path: str, size: int) -> Decoded:
    """Decode ``path`` to uint8 ``(size, size)``; raises :class:`Quarantine` for a bad file."""
    im = _open(path)
    try:
        mode, (width, height) = im.mode, im.size
        gray, is_float = to_gray(im)
        pixels = resize_gray(gray, is_float, size)
    except Quarantine:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a mode PIL cannot convert
        raise Quarantine(CORRUPT, _short(exc)) from None
    finally:
        im.close()
    return Decoded(pixels, mode, width, height)


def reason_kind(reason: str) -> str:
    """The kind part of a ``kind: detail`` reason."""
    return reason.split(": ", 1)[0]


# --------------------------------------------------------------------------- batches
def decode_batch(batch: pa.Table, *, size: int, path_column: str = "path",
                 throttle_s: float = 0.0) -> pa.Table:
    """``map_batches`` function: paths in → pixels + status out, one row per input row.

    Every input column but ``path_column`` passes through.  Added columns:

    * ``pixels``: ``fixed_size_binary[size*size]``, row-major uint8 (null when quarantined);
    * ``status``: ``"ok"`` or ``"quarantined"``;
    * ``reason``: null, or ``"kind: detail"`` (see the module docstring);
    * ``source_mode``, ``source_width``, ``source_height``: what the file was.

    ``throttle_s`` sleeps that long per batch: a testing aid only (it lets a test kill a
    run reliably mid-way); 0 in normal use.
    """
    paths = batch.column(path_column).to_pylist()
    n = len(paths)
    pixels = np.zeros((n, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    reasons: list[str | None] = [None] * n
    modes: list[str | None] = [None] * n
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    for i, path in enumerate(paths):
        try:
            decoded = decode_image(path or "", size)
        except Quarantine as exc:
            reasons[i] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - never lose a row (MemoryError, bugs)
            reasons[i] = f"{CORRUPT}: {_short(exc)}"
            continue
        pixels[i] = decoded.pixels
        ok[i] = True
        modes[i], widths[i], heights[i] = decoded.mode, decoded.width, decoded.height
    if throttle_s > 0:
        time.sleep(throttle_s)
    validity = pa.py_buffer(np.packbits(ok, bitorder="little").tobytes())
    pixel_array = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(size * size), n, [validity, pa.py_buffer(pixels)], null_count=int(n - ok.sum()))
    out = batch.drop_columns([path_column])
    for name, values in (
        ("pixels", pixel_array),
        ("status", pa.array(np.where(ok, "ok", "quarantined"), pa.string())),
        ("reason", pa.array(reasons, pa.string())),
        ("source_mode", pa.array(modes, pa.string())),
        ("source_width", pa.array(widths)),
        ("source_height", pa.array(heights)),
    ):
        out = out.append_column(name, values)
    return out


def pixels_to_numpy(column: pa.Array | pa.ChunkedArray, size: int) -> np.ndarray:
    """A ``fixed_size_binary[size*size]`` column (no nulls) → uint8 ``(n, size, size)``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if column.type != pa.binary(size * size):
        raise ValueError(f"pixels column is {column.type}, expected fixed_size_binary[{size * size}]")
    if column.null_count:
        raise ValueError(f"pixels column has {column.null_count} null row(s)")
    data = column.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=n * size * size,
                         offset=column.offset * size * size)
    return flat.reshape(n, size, size)
