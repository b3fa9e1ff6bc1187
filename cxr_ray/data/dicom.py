"""Decode a DICOM file into 8-bit grey pixels at the training resolution, or say why not.

The grey levels a radiologist's viewer shows, in this order (DICOM PS3.3 C.11; PS3.4 N.2):

1. **Modality LUT**: ``stored × RescaleSlope + RescaleIntercept`` (or the file's Modality LUT
   Sequence), pydicom's ``apply_modality_lut``.
2. **VOI**: the file's VOI LUT Sequence, else its first Window Center / Width (the linear
   function of PS3.3 C.11.2.1.2), else the **full stored range** (``BitsStored`` bits, signed
   when ``PixelRepresentation`` is 1, through the modality LUT): no contrast stretch from the
   image's own histogram, so two files of one detector keep their relative brightness.
3. **MONOCHROME1** (white = low values) is inverted, so every output has bone bright.
4. The [0, 1] result is scaled to 0–255 and resized exactly as ``prepare`` resizes PNGs
   (:func:`cxr_ray.data.decode.resize_gray`, antialiased bilinear, non-square stretched),
   rounded once.

Compressed transfer syntaxes decode through pydicom's pixel handlers (RLE built in; JPEG,
JPEG-LS and JPEG 2000 through the pylibjpeg plugins when installed: ``pip install
'cxr-ray[dicom]'``); without one the reason names the transfer syntax and the plugin to
install. Multi-frame files use their first frame (the source description says so). Nothing
from the header that identifies a patient is returned: only the photometric interpretation,
bit depth and size.
"""

from __future__ import annotations


import numpy as np
from PIL import Image

from cxr_ray.data.decode import (
    CORRUPT,
    NOT_IMAGE,
    TRUNCATED,
    UNSUPPORTED,
    Decoded,
    Quarantine,
    _short,
    check_file,
    resize_gray,
)

#: File name endings read as DICOM even without the "DICM" preamble.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
#: Transfer syntaxes and the pylibjpeg plugin that decodes them.
_PLUGINS = {"JPEG 2000": "pylibjpeg-openjpeg", "JPEG-LS": "pylibjpeg-libjpeg",
            "JPEG": "pylibjpeg-libjpeg", "RLE": "pylibjpeg-rle"}


def is_dicom(path: str) -> bool:
    """True for a file with the DICOM preamble ("DICM" at byte 128) or a DICOM suffix."""
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _plugin_for(syntax_name: str) -> str:
    for key, plugin in _PLUGINS.items():
        if key in syntax_name:
            return plugin
    return "a pydicom pixel-data plugin"


def decode_dicom(path: str, size: int) -> Decoded:
    """Decode a DICOM file to uint8 ``(size, size)``; raises :class:`Quarantine` for a bad
    file. ``Decoded.mode`` describes the source (``DICOM MONOCHROME2 12-bit``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    check_file(path)
    try:
        ds = pydicom.dcmread(path, force=path.lower().endswith(DICOM_SUFFIXES))
    except InvalidDicomError as exc:
        raise Quarantine(NOT_IMAGE, f"not a DICOM file ({_short(exc)})") from None
    except (EOFError, OSError) as exc:
        raise Quarantine(TRUNCATED, _short(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a malformed header must not lose the row
        raise Quarantine(CORRUPT, _short(exc)) from None
    if "PixelData" not in ds:
        raise Quarantine(NOT_IMAGE, "DICOM file without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise Quarantine(UNSUPPORTED, f"DICOM {photometric}: only greyscale (MONOCHROME1/2) "
                                      "radiographs are read")
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise Quarantine(UNSUPPORTED, f"compressed DICOM ({name}) needs a decoder: pip "
                             f"install pylibjpeg {_plugin_for(name)}") from None
        raise Quarantine(CORRUPT, _short(exc)) from None
    except (EOFError, ValueError) as exc:
        raise Quarantine(TRUNCATED, f"pixel data: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise Quarantine(CORRUPT, _short(exc)) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise Quarantine(UNSUPPORTED, f"DICOM pixel array of shape {pixels.shape}")
    try:
        gray = _to_unit(pixels, ds, apply_modality_lut, apply_voi_lut)
    except Quarantine:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Quarantine(CORRUPT, f"grey levels: {_short(exc)}") from None
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
    height, width = gray.shape
    image = Image.fromarray((gray * 255.0).astype(np.float32), mode="F")
    bits = int(ds.get("BitsStored", 8) or 8)
    mode = f"DICOM {photometric} {bits}-bit" + (f", frame 1 of {frames}" if frames > 1 else "")
    return Decoded(resize_gray(image, True, size), mode, width, height)


def _to_unit(stored: np.ndarray, ds, modality_lut, voi_lut) -> np.ndarray:
    """Stored values → modality values → VOI → [0, 1] float."""
    values = np.asarray(modality_lut(stored, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        out = np.asarray(voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        top = float(2 ** int(descriptor[2]) - 1)
        return np.clip(out / top, 0.0, 1.0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if _multi(center) else center)
        w = float(width[0] if _multi(width) else width)
        if w >= 1:
            # PS3.3 C.11.2.1.2.1, linear: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped
            return np.clip((values - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0)
    bits = int(ds.get("BitsStored", 8) or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo_hi = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1],
                     dtype=np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = sorted(lo_hi * slope + intercept)
    if hi <= lo:
        raise Quarantine(UNSUPPORTED, f"DICOM stored range is empty ({bits} bits)")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _multi(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
