"""The images to predict and reading one of them.

``--images`` is a directory (every regular file under it, recursively, in sorted order,
except hidden files and the NIH metadata files that may sit beside the images:
``Data_Entry_2017*.csv``, ``BBox_List_2017.csv``, ``train_val_list.txt``, ``test_list.txt``)
or a text file listing one path per line (relative paths from the list's folder; blank
lines and ``#`` comments skipped). Every listed file gets exactly one output row: a file that
cannot be read (a text file, a cut-short PNG, an empty file, a DICOM without a decoder)
gets its reason instead of probabilities; nothing is dropped.

One file is read as ``prepare`` reads the training set (:func:`cxr_ray.data.decode.
decode_image`: 8/16-bit, RGB/RGBA, non-square stretched, antialiased resize) or, when it is
DICOM, by :func:`cxr_ray.data.dicom.decode_dicom`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cxr_ray.data.decode import CORRUPT, Quarantine, _short, decode_image
from cxr_ray.data.dicom import decode_dicom, is_dicom
from cxr_ray.errors import UserError

#: Files beside the images that are not inputs.
_METADATA = re.compile(r"^(Data_Entry_2017.*\.csv(\.gz)?|BBox_List_2017\.csv|"
                       r"train_val_list\.txt|test_list\.txt)$")


def list_inputs(images: str | Path) -> list[str]:
    """The input files of ``--images`` (see the module docstring), as strings."""
    src = Path(images).expanduser()
    if src.is_dir():
        files = sorted(str(p) for p in src.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(src).parts)
                       and not _METADATA.match(p.name))
    elif src.is_file():
        base = src.parent
        files = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line).expanduser()
                files.append(str(p if p.is_absolute() else base / p))
    else:
        raise UserError(f"--images {images}: no such directory or list file")
    if not files:
        raise UserError(f"--images {images}: no input files there")
    return files


def read_input(path: str, size: int) -> tuple[np.ndarray | None, str, str]:
    """``(pixels uint8 (size, size) or None, source description, reason)``; never raises."""
    try:
        decoded = decode_dicom(path, size) if is_dicom(path) else decode_image(path, size)
    except Quarantine as exc:
        return None, "", str(exc)
    except Exception as exc:  # noqa: BLE001 - never lose a row
        return None, "", f"{CORRUPT}: {_short(exc)}"
    source = (decoded.mode if decoded.mode.startswith("DICOM") else f"image {decoded.mode}")
    return decoded.pixels, f"{source} {decoded.width}x{decoded.height}", ""
