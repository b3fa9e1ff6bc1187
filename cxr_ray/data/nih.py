"""NIH ChestX-ray14 metadata: read, validate, one-hot encode, count.

Owns the label vocabulary and the metadata table every later stage uses.

Wang et al., "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on
Weakly-Supervised Classification and Localization of Common Thorax Diseases", CVPR 2017.
112,120 frontal chest X-rays of 30,805 patients; ``Data_Entry_2017.csv`` has one row
per image and ``Finding Labels`` is ``|``-separated (``Cardiomegaly|Effusion``) or
``No Finding``.

Labels are split on ``|`` exactly: matching by substring (``str.contains``) is a
known bug in other loaders and is never done here.  The default metadata is the real
table of all 112,120 images shipped inside the ``torchxrayvision`` package
(``data/Data_Entry_2017_v2020.csv.gz``), located without importing that package.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_ray.errors import UserError

log = logging.getLogger(__name__)

NO_FINDING = "No Finding"
#: The 14 findings, spelled as in the CSV (note ``Pleural_Thickening``), in the study's order.
DISEASES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Emphysema", "Effusion",
    "Fibrosis", "Infiltration", "Mass", "Nodule", "Pneumothorax", "Pneumonia",
    "Pleural_Thickening", "Hernia",
)
#: All 15 label values: ``No Finding`` first, then the diseases.
LABELS: tuple[str, ...] = (NO_FINDING, *DISEASES)

IMAGE = "Image Index"
FINDINGS = "Finding Labels"
PATIENT = "Patient ID"
SEX = "Patient Gender"
#: Columns every metadata file must have (after renaming ``Patient Sex`` → ``Patient Gender``).
REQUIRED_COLUMNS: tuple[str, ...] = (
    IMAGE, FINDINGS, "Follow-up #", PATIENT, "Patient Age", SEX, "View Position",
)
_SEX_2020 = "Patient Sex"
_PACKAGED = ("torchxrayvision", "data", "Data_Entry_2017_v2020.csv.gz")


def packaged_metadata_path() -> Path:
    """Path of the real NIH table inside the installed ``torchxrayvision`` package."""
    spec = importlib.util.find_spec(_PACKAGED[0])  # locates without importing (no torch import)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "no --metadata given and torchxrayvision is not installed; "
            "install it (pip install 'torchxrayvision>=1.5,<1.6') or pass --metadata PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_PACKAGED[1:])
    if not path.is_file():
        raise UserError(f"{path} is missing from the torchxrayvision install; "
                        "reinstall torchxrayvision 1.5.x or pass --metadata PATH")
    return path


def load_metadata(path: str | Path | None = None) -> pd.DataFrame:
    """Read and validate NIH metadata (CSV or CSV.gz); default: the packaged real table.

    Returns the table with canonical column names, ``Patient ID`` as int and one
    boolean column per label in :data:`LABELS` (the one-hot encoding).  The row order
    of the file is kept.  Raises :class:`UserError` with the file and line for a
    missing column, an empty or non-CSV file, an unknown finding or a duplicate image.
    """
    path = Path(path) if path is not None else packaged_metadata_path()
    raw = _read_csv(path)
    meta = _canonical_columns(raw, path)
    meta = _validate_rows(meta, path)
    onehot = one_hot(meta[FINDINGS], path)
    return pd.concat([meta.reset_index(drop=True), onehot], axis=1)


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise UserError(f"{path}: no such file; pass the NIH Data_Entry_2017.csv (or .csv.gz)")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass the metadata CSV file inside it")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; pass the NIH Data_Entry_2017.csv (or .csv.gz)")
    try:
        frame = pd.read_csv(path, compression="infer", dtype=str, keep_default_na=False,
                            skipinitialspace=True)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError,
            csv.Error, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable CSV ({first}); "
                        "pass the NIH Data_Entry_2017.csv (or .csv.gz)") from None
    if frame.empty:
        raise UserError(f"{path} has a header but no rows; pass a metadata file with images")
    return frame


def _canonical_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    frame = frame.rename(columns=lambda c: str(c).strip())
    # The 2020 revision ends rows with an empty column: pandas calls it "Unnamed: N".
    empty = [c for c in frame.columns
             if c.startswith("Unnamed:") and (frame[c].astype(str).str.strip() == "").all()]
    frame = frame.drop(columns=empty)
    if _SEX_2020 in frame.columns and SEX not in frame.columns:
        frame = frame.rename(columns={_SEX_2020: SEX})
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        alias = " (or 'Patient Sex')" if SEX in missing else ""
        raise UserError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}{alias}; "
            f"found {', '.join(repr(c) for c in frame.columns[:12])}; "
            "the file must have the NIH Data_Entry_2017.csv header"
        )
    return frame


def _line(row: int) -> int:
    """File line number of data row ``row`` (0-based): the header is line 1."""
    return int(row) + 2


def _validate_rows(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    frame = frame.copy()
    for col in (IMAGE, FINDINGS, PATIENT):
        frame[col] = frame[col].astype(str).str.strip()
        blank = np.flatnonzero((frame[col] == "").to_numpy())
        if blank.size:
            raise UserError(f"{path}, line {_line(blank[0])}: empty {col!r}; "
                            f"every row needs an {col!r} ({blank.size} row(s) affected)")
    dup = frame[IMAGE].duplicated(keep="first").to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        name = frame[IMAGE].iat[row]
        first = int(np.flatnonzero((frame[IMAGE] == name).to_numpy())[0])
        raise UserError(f"{path}, line {_line(row)}: duplicate Image Index {name!r} "
                        f"(first on line {_line(first)}); each image must appear once")
    pid = pd.to_numeric(frame[PATIENT], errors="coerce")
    bad = np.flatnonzero(pid.isna().to_numpy() | (pid.to_numpy() % 1 != 0))
    if bad.size:
        raise UserError(f"{path}, line {_line(bad[0])}: Patient ID {frame[PATIENT].iat[bad[0]]!r} "
                        "is not an integer; fix or remove that row")
    frame[PATIENT] = pid.astype(np.int64)
    return frame


def one_hot(findings: pd.Series, path: Path | str = "<metadata>") -> pd.DataFrame:
    """One boolean column per label in :data:`LABELS`, splitting on ``|`` exactly.

    A row counts in every class it names.  Unknown labels and ``No Finding`` combined
    with a finding are errors naming the line, the value and the valid labels.
    """
    dummies = findings.astype(str).str.get_dummies(sep="|")
    dummies.columns = [str(c) for c in dummies.columns]
    unknown = [c for c in dummies.columns if c not in LABELS]
    if unknown:
        label = unknown[0]
        row = int(np.flatnonzero(dummies[label].to_numpy())[0])
        hint = _label_hint(label)
        raise UserError(
            f"{path}, line {_line(row)}: unknown finding {label!r} in {findings.iat[row]!r}"
            f"{hint}; valid labels: {', '.join(LABELS)}"
        )
    out = pd.DataFrame({lab: (dummies[lab].to_numpy() > 0) if lab in dummies else
                        np.zeros(len(findings), dtype=bool) for lab in LABELS})
    mixed = out[NO_FINDING].to_numpy() & out[list(DISEASES)].to_numpy().any(axis=1)
    if mixed.any():
        row = int(np.flatnonzero(mixed)[0])
        raise UserError(f"{path}, line {_line(row)}: {findings.iat[row]!r} combines "
                        f"'No Finding' with a finding; a row is either 'No Finding' or findings")
    return out


def _label_hint(label: str) -> str:
    canon = {lab.lower().replace("_", " ").strip(): lab for lab in LABELS}
    guess = canon.get(label.lower().replace("_", " ").strip())
    return f" (did you mean {guess!r}?)" if guess else ""


def class_table(meta: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per class: ``exact`` (the row's whole label is that class) and ``anywhere``.

    This is the study's Table 1 ("before/after one-hot encoding").
    """
    findings = meta[FINDINGS].astype(str)
    return {lab: {"exact": int((findings == lab).sum()), "anywhere": int(meta[lab].sum())}
            for lab in LABELS}


def format_class_table(classes: dict[str, dict[str, int]]) -> str:
    lines = [f"{'class':<20}{'exact':>8}{'anywhere':>10}"]
    lines += [f"{lab:<20}{c['exact']:>8}{c['anywhere']:>10}" for lab, c in classes.items()]
    return "\n".join(lines)


def write_metadata(meta: pd.DataFrame, path: Path) -> None:
    """Write metadata back in the NIH layout (label columns dropped, canonical header)."""
    cols = [c for c in meta.columns if c not in LABELS]
    buf = io.StringIO()
    meta[cols].to_csv(buf, index=False)
    Path(path).write_text(buf.getvalue())
