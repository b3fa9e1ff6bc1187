"""The embedded data set: real NIH metadata rows, synthetic but learnable images.

No ChestX-ray14 pixels ship anywhere we can reach, so ``cxr-ray synth`` writes a data
set in the NIH layout (``images/<Image Index>.png``, ``Data_Entry_2017.csv``,
``train_val_list.txt``/``test_list.txt``, and ``BBox_List_2017.csv``: where each reported
finding was drawn, one box per shape) whose metadata rows are real (sampled from
the real table: labels, patients and views are genuine) and whose images are drawn:

* a chest-like base with per-patient anatomy: body, two lung fields with rib shadows
  and vessel markings, spine, heart, and sensor noise (so PNGs are hundreds of KB at
  1024², like the real ones, and decode benchmarks mean something);
* for each finding an image carries, a distinct pattern (a plate-like band for
  atelectasis, an enlarged heart for cardiomegaly, a basal meniscus for effusion, ...)
  drawn with per-image position, size and contrast (:data:`CONTRAST`).  Every pattern
  is visible at the demo's 48² training resolution; what differs between diseases is how
  fast the demo's stage 1 (5 epochs from scratch, each cohort with its own optimizer)
  picks it up, so cohorts end stage 1 between about 74 % and 94 % validation accuracy
  (mean over three training seeds), not equally hard, with room left for stage 2
  (``bench/learnability.py`` measures it);
* label noise: :data:`UNREPORTED` of the No Finding images carry a finding that the
  report (the labels are text-mined) missed.  It costs the binary cohorts little (their
  models learn their own finding) and keeps the one-class cohort, which trains on
  seven times as many images and flags any finding, from being trivial.

Every image depends only on ``(seed, Image Index, its labels, size)``, never on the
order of generation, so the set is deterministic per seed and generated in parallel.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_ray.data import cohorts, nih
from cxr_ray.errors import UserError

log = logging.getLogger(__name__)

#: Bump when the drawing changes, so data sets record which generator made them.
GENERATOR_VERSION = 2

#: Per-disease contrast range (fraction of full scale) of a finding's pattern; for
#: Cardiomegaly the heart's enlargement (a normal heart is 0.88-1.12 × the mean size), for
#: Emphysema the lungs' extra darkness (they also grow by 0.4 × it); Fibrosis also shrinks
#: the lungs (by 0.08 × it) and makes them denser (0.3 × it).  Tuned with
#: ``bench/learnability.py``.
CONTRAST: dict[str, tuple[float, float]] = {
    "Atelectasis": (0.40, 0.80), "Cardiomegaly": (0.24, 0.50), "Consolidation": (0.22, 0.55),
    "Edema": (0.07, 0.20), "Emphysema": (0.06, 0.19), "Effusion": (0.17, 0.50),
    "Fibrosis": (0.70, 1.60), "Infiltration": (0.07, 0.22), "Mass": (0.40, 0.75),
    "Nodule": (0.55, 0.95), "Pneumothorax": (0.12, 0.40), "Pneumonia": (0.30, 0.80),
    "Pleural_Thickening": (0.20, 0.55), "Hernia": (0.20, 0.50),
}
#: Fraction of No Finding images that carry an unreported finding (label noise: the NIH
#: labels are mined from report text), drawn at this fraction of its contrast range.
UNREPORTED = 0.2
UNREPORTED_CONTRAST = (0.5, 1.0)
UNREPORTABLE = tuple(d for d in nih.DISEASES if d not in ("Cardiomegaly", "Emphysema"))


@dataclass(frozen=True)
class SynthResult:
    out: Path
    images: int
    megabytes: float
    seconds: float


# ----------------------------------------------------------------------------- metadata
def sample_rows(meta: pd.DataFrame, per_class: int, seed: int,
                single_finding: bool = False) -> pd.DataFrame:
    """Real metadata rows: ``per_class`` images carrying each disease, plus No Finding.

    Diseases are drawn rarest first without replacement, so multi-label rows count
    for every class they name.  As many No Finding rows as disease rows are drawn
    (the real table is 54 % No Finding), so every binary cohort can have 1:1
    negatives and the one-class cohort is about balanced.  ``single_finding``: only
    rows naming one label are drawn (each disease still has ``per_class`` of them
    where the real table has that many).
    """
    if per_class < 1:
        raise UserError(f"--per-class {per_class}: must be at least 1")
    if single_finding:
        meta = meta[~meta[nih.FINDINGS].str.contains("|", regex=False)].reset_index(drop=True)
    rng = np.random.default_rng([seed, 0x5EED])
    taken = np.zeros(len(meta), dtype=bool)
    for disease in sorted(nih.DISEASES, key=lambda d: int(meta[d].sum())):
        have = int((meta[disease].to_numpy() & taken).sum())
        pool = np.flatnonzero(meta[disease].to_numpy() & ~taken)
        need = max(0, per_class - have)
        if need:
            taken[rng.choice(pool, size=min(need, len(pool)), replace=False)] = True
    pool = np.flatnonzero(meta[nih.NO_FINDING].to_numpy())
    taken[rng.choice(pool, size=min(int(taken.sum()), len(pool)), replace=False)] = True
    return meta.iloc[np.flatnonzero(taken)].reset_index(drop=True)


# ----------------------------------------------------------------------------- drawing
class _Canvas:
    """A float image in [0, 1] with coordinates normalised to [0, 1] on both axes."""

    def __init__(self, size: int):
        self.size = size
        self.img = np.zeros((size, size), dtype=np.float32)
        self.boxes: list[tuple[str, float, float, float, float]] = []

    def box(self, label: str, x0: float, y0: float, x1: float, y1: float) -> None:
        """Record where a finding was drawn: normalised corners → pixels ``(x, y, w, h)``,
        clipped to the image."""
        s = self.size
        x0, y0 = max(0.0, x0) * s, max(0.0, y0) * s
        x1, y1 = min(1.0, x1) * s, min(1.0, y1) * s
        if x1 > x0 and y1 > y0:
            self.boxes.append((label, x0, y0, x1 - x0, y1 - y0))

    def ellipse(self, cx, cy, rx, ry, value, edge=0.15, angle=0.0, texture=None, out=None,
                box=None):
        """Add ``value`` inside a soft-edged (``edge`` = fraction of radius) rotated ellipse.

        Only the bounding window is computed, so small shapes are cheap at 1024².
        Returns the window's mask for callers that need it. ``box``: a finding label under
        which the ellipse's extent (``d <= 1``) is recorded (:meth:`box`).
        """
        if box:
            ca, sa = math.cos(angle), math.sin(angle)
            hx, hy = math.hypot(rx * ca, ry * sa), math.hypot(rx * sa, ry * ca)
            self.box(box, cx - hx, cy - hy, cx + hx, cy + hy)
        s = self.size
        r = max(rx, ry) * (1 + edge)
        x0, x1 = max(0, int((cx - r) * s)), min(s, int(math.ceil((cx + r) * s)) + 1)
        y0, y1 = max(0, int((cy - r) * s)), min(s, int(math.ceil((cy + r) * s)) + 1)
        if x0 >= x1 or y0 >= y1:
            return None
        ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) / s - cy
        xs = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) / s - cx
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            xs, ys = xs * ca + ys * sa, -xs * sa + ys * ca
        d = np.sqrt((xs / rx) ** 2 + (ys / ry) ** 2)
        mask = np.clip((1 + edge - d) / max(edge, 1e-3), 0.0, 1.0)
        if texture is not None:
            mask = mask * texture[y0:y1, x0:x1]
        target = self.img if out is None else out
        target[y0:y1, x0:x1] += value * mask
        return (slice(y0, y1), slice(x0, x1)), mask


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a ``cells``² grid upsampled bilinearly."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 1.5


@dataclass
class _Anatomy:
    lungs: tuple[tuple[float, float, float, float], ...]  # (cx, cy, rx, ry) image-left, -right
    heart: tuple[float, float, float, float]


def draw_image(image_index: str, findings: tuple[str, ...], size: int, seed: int,
               boxes: list[tuple[str, float, float, float, float]] | None = None,
               label_noise: bool = True) -> np.ndarray:
    """One synthetic chest X-ray as uint8 (size, size); depends only on its arguments.

    ``boxes``, when given, receives where each reported finding was drawn, as ``(label, x,
    y, w, h)`` in pixels (the layout of NIH's ``BBox_List_2017.csv``): one box per drawn
    shape (several for Nodule and Infiltration, both lungs for Edema, Emphysema and
    Fibrosis). Findings the report missed (the label noise of No Finding images) get none;
    ``label_noise=False`` draws none (every No Finding image is clean)."""
    rng = np.random.default_rng([seed, zlib.crc32(image_index.encode())])
    c = _Canvas(size)
    s = size
    yy = (np.arange(s, dtype=np.float32)[:, None] + 0.5) / s
    xx = (np.arange(s, dtype=np.float32)[None, :] + 0.5) / s
    has = set(findings)

    def u(lo, hi):
        return float(rng.uniform(lo, hi))

    unreported = 1.0  # contrast factor of the findings drawn (< 1: an unreported one)

    def contrast(d):
        lo, hi = CONTRAST[d]
        return u(lo, hi) * unreported

    # Per-patient anatomy and exposure.
    c.img += u(0.02, 0.08)
    c.ellipse(0.5 + u(-0.02, 0.02), 0.56, u(0.42, 0.48), u(0.55, 0.62), u(0.40, 0.50), edge=0.08)
    emphysema = contrast("Emphysema") if "Emphysema" in has else 0.0
    fibrosis = contrast("Fibrosis") if "Fibrosis" in has else 0.0
    inflate = 1.0 + 0.4 * emphysema - 0.08 * fibrosis  # hyperinflated / shrunken lungs
    lw, lh, ly = u(0.12, 0.15) * inflate, u(0.27, 0.32) * inflate, u(0.42, 0.47)
    lungs = ((0.5 - u(0.16, 0.19), ly, lw, lh), (0.5 + u(0.16, 0.19), ly, lw * 0.95, lh * 0.97))
    lung_field = np.zeros((s, s), dtype=np.float32)
    for cx, cy, rx, ry in lungs:
        c.ellipse(cx, cy, rx, ry, 1.0, edge=0.12, out=lung_field)
    np.clip(lung_field, 0.0, 1.0, out=lung_field)
    lung_dark = u(0.22, 0.30) + emphysema - 0.3 * fibrosis  # fibrotic lungs: denser
    c.img -= lung_dark * lung_field
    # Vessel markings: what a pneumothorax lacks.
    markings = _smooth_noise(rng, s, 24) * 0.04 * lung_field
    c.img += markings
    # Rib shadows: curved periodic bands across each lung.
    period = u(0.065, 0.08)
    for side, (cx, _, _, _) in enumerate(lungs):
        half = (xx < 0.5) if side == 0 else (xx >= 0.5)
        phase = (yy - 0.9 * (xx - cx) ** 2) / period
        ribs = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6
        c.img += 0.05 * ribs * lung_field * half
    c.ellipse(0.5, 0.5, 0.035, 0.5, u(0.10, 0.16), edge=0.3)  # spine / mediastinum
    scale = 1.0 + contrast("Cardiomegaly") if "Cardiomegaly" in has else u(0.88, 1.12)
    heart = (0.54 + u(-0.01, 0.01), 0.63, 0.11 * scale, 0.095 * scale)
    c.ellipse(*heart, u(0.16, 0.22), edge=0.12, box="Cardiomegaly" if "Cardiomegaly" in has
              else None)
    if emphysema:
        for cx, cy, rx, ry in lungs:
            c.box("Emphysema", cx - rx, cy - ry, cx + rx, cy + ry)

    # Label noise: some No Finding images carry a finding the report missed.
    # (drawn whether or not it is used, so the rest of the image is the same either way)
    if has == {nih.NO_FINDING} and u(0.0, 1.0) < UNREPORTED and label_noise:
        findings = (UNREPORTABLE[int(rng.integers(len(UNREPORTABLE)))],)
        unreported = u(*UNREPORTED_CONTRAST)

    # Findings: each draws its own position, size and contrast.
    for d in findings:
        if d == nih.NO_FINDING or d == "Cardiomegaly" or d == "Emphysema":
            continue
        b = d if unreported == 1.0 else None  # a reported finding: record its box
        k = int(rng.integers(2))
        lcx, lcy, lrx, lry = lungs[k]
        if d == "Atelectasis":
            c.ellipse(lcx + u(-0.4, 0.4) * lrx, lcy + u(0.25, 0.6) * lry, u(0.09, 0.14),
                      u(0.02, 0.035), contrast(d), edge=0.4, angle=u(-0.3, 0.3), box=b)
        elif d == "Consolidation":
            r = u(0.08, 0.13)
            c.ellipse(lcx + u(-0.3, 0.3) * lrx, lcy + u(0.0, 0.5) * lry, r, r * u(0.7, 1.2),
                      contrast(d), edge=0.4, box=b)
        elif d == "Edema":
            v = contrast(d)
            for cx, cy, rx, ry in lungs:
                c.ellipse(0.5 + (cx - 0.5) * 0.7, cy + 0.03, rx * 0.8, ry * 0.6, v, edge=1.0,
                          box=b)
        elif d == "Effusion":
            h = u(0.08, 0.22) * lry * 2
            base = lcy + lry * 0.95
            meniscus = np.clip((yy - (base - h) - 0.4 * h * ((xx - lcx) / lrx) ** 2) / (0.2 * h), 0, 1)
            side = (xx < 0.5) if k == 0 else (xx >= 0.5)
            c.img += contrast(d) * meniscus * lung_field * side
            if b:
                c.box(b, lcx - lrx, base - h, lcx + lrx, lcy + lry)
        elif d == "Fibrosis":
            theta = u(0, np.pi)
            freq = u(6, 9)
            net = (np.cos(2 * np.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
                   * np.cos(2 * np.pi * freq * (-xx * math.sin(theta) + yy * math.cos(theta))))
            upper = np.clip((0.75 - yy) / 0.3, 0.5, 1)
            c.img += (fibrosis or contrast(d)) * np.maximum(net, 0) * lung_field * upper
            for cx, cy, rx, ry in (lungs if b else ()):
                c.box(b, cx - rx, cy - ry, cx + rx, cy + ry)
        elif d == "Hernia":
            r = u(0.045, 0.075)
            cx, cy = 0.5 + u(-0.04, 0.04), heart[1] + u(0.02, 0.06)
            v = contrast(d)
            c.ellipse(cx, cy, r, r * u(0.8, 1.0), v, edge=0.15, box=b)
            c.ellipse(cx + u(-0.3, 0.3) * r, cy - 0.3 * r, r * 0.35, r * 0.25, -0.8 * v, edge=0.3)
        elif d == "Infiltration":
            v = contrast(d)
            for _ in range(int(rng.integers(3, 8))):
                j = int(rng.integers(2))
                cx, cy, rx, ry = lungs[j]
                r = u(0.02, 0.04)
                c.ellipse(cx + u(-0.6, 0.6) * rx, cy + u(-0.6, 0.6) * ry, r, r * u(0.6, 1.4),
                          v * u(0.6, 1.0), edge=0.8, box=b)
        elif d == "Mass":
            r = u(0.07, 0.11)
            c.ellipse(lcx + u(-0.5, 0.5) * lrx, lcy + u(-0.5, 0.0) * lry, r, r * u(0.85, 1.15),
                      contrast(d), edge=0.25, box=b)
        elif d == "Nodule":
            v = contrast(d)
            for _ in range(int(rng.integers(2, 6))):  # in either lung, upper and mid zones
                cx, cy, rx, ry = lungs[int(rng.integers(2))]
                r = u(0.04, 0.055)
                c.ellipse(cx + u(-0.6, 0.6) * rx, cy + u(-0.7, 0.2) * ry, r, r,
                          v * u(0.8, 1.0), edge=0.25, box=b)
        elif d == "Pleural_Thickening":
            lateral = lcx - lrx * 0.92 if k == 0 else lcx + lrx * 0.92
            c.ellipse(lateral, lcy + u(-0.4, 0.3) * lry, u(0.018, 0.03), u(0.10, 0.18) * 1.5,
                      contrast(d), edge=0.4, box=b)
        elif d == "Pneumonia":
            r = u(0.05, 0.08)
            texture = 0.6 + 0.4 * np.clip(_smooth_noise(rng, s, 40), -1, 1)
            c.ellipse(lcx + u(-0.3, 0.3) * lrx, lcy + u(-0.1, 0.5) * lry, r, r * u(0.8, 1.3),
                      contrast(d), edge=0.8, texture=texture, box=b)
        elif d == "Pneumothorax":
            v = contrast(d)
            cx = lcx - 0.45 * lrx if k == 0 else lcx + 0.45 * lrx
            cy = lcy - u(0.3, 0.55) * lry
            rx, ry = lrx * u(0.45, 0.65), lry * u(0.3, 0.5)
            region = np.zeros((s, s), dtype=np.float32)
            c.ellipse(cx, cy, rx, ry, 1.0, edge=0.05, out=region)
            region *= lung_field
            if b:
                c.box(b, max(cx - rx, lcx - lrx), max(cy - ry, lcy - lry),
                      min(cx + rx, lcx + lrx), min(cy + ry, lcy + lry))
            c.img -= region * (markings + v)  # no markings, darker
            c.ellipse(cx, cy, rx * 1.02, ry * 1.02, v * 0.8, edge=0.04)  # pleural line ...
            c.ellipse(cx, cy, rx * 0.99, ry * 0.99, -v * 0.8, edge=0.04)  # ... as a thin rim
        else:  # pragma: no cover - the vocabulary is closed
            raise AssertionError(d)

    # Exposure, detector noise, quantisation.
    c.img *= u(0.9, 1.1)
    c.img += rng.normal(0.0, 0.012, size=(s, s)).astype(np.float32)
    if boxes is not None:
        boxes.extend(c.boxes)
    return (np.clip(c.img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- writing
def _write_one(job: tuple[str, tuple[str, ...], int, int, str, bool]
               ) -> tuple[int, list[tuple[str, float, float, float, float]]]:
    image_index, findings, size, seed, folder, label_noise = job
    boxes: list[tuple[str, float, float, float, float]] = []
    pixels = draw_image(image_index, findings, size, seed, boxes, label_noise)
    path = Path(folder) / image_index
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels, mode="L").save(tmp, format="PNG", compress_level=6)
    os.replace(tmp, path)
    return path.stat().st_size, boxes


#: NIH's bounding-box list: ``Image Index, Finding Label, Bbox [x,y,w,h]`` and three unnamed
#: columns (the box's x, y, w, h spread over four columns, in pixels of the image).
BBOX_FILE = "BBox_List_2017.csv"


def write_boxes(boxes: dict[str, list[tuple[str, float, float, float, float]]],
                path: Path) -> int:
    """Write the boxes in NIH's ``BBox_List_2017.csv`` layout; → rows written."""
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for image, found in boxes.items():
        for label, x, y, w, h in found:
            lines.append(f"{image},{label},{x:.2f},{y:.2f},{w:.2f},{h:.2f}")
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def read_boxes(path: str | Path) -> pd.DataFrame:
    """``BBox_List_2017.csv`` (NIH's or synth's) → columns image, label, x, y, w, h."""
    frame = pd.read_csv(path)
    frame = frame.iloc[:, :6]
    frame.columns = ["image", "label", "x", "y", "w", "h"]
    return frame


def write_split_lists(rows: pd.DataFrame, out: Path, seed: int, test_fraction: float = 0.2) -> None:
    """NIH-format split lists for this set: a seeded patient-wise 80/20 split of its rows."""
    frame = pd.DataFrame({"image_index": rows[nih.IMAGE].to_numpy(),
                          "patient_id": rows[nih.PATIENT].to_numpy()})
    is_test = cohorts.patient_split(frame, test_fraction, seed, "official")
    (out / "train_val_list.txt").write_text("\n".join(frame["image_index"][~is_test]) + "\n")
    (out / "test_list.txt").write_text("\n".join(frame["image_index"][is_test]) + "\n")


def write_dataset(out: str | Path, *, per_class: int = 40, size: int = 1024, seed: int = 0,
                  metadata: str | Path | None = None, workers: int | None = None,
                  single_finding: bool = False) -> SynthResult:
    """Write the embedded data set to ``out`` and return what was written.

    ``single_finding``: a controlled variant for checking what a model looks at (the
    heatmaps' tests): only real rows naming one label, and no label noise, so a
    finding's drawn shape is the only thing that tells its images from No Finding."""
    if size < 32:
        raise UserError(f"--size {size}: images must be at least 32 pixels")
    out = Path(out)
    start = time.perf_counter()
    rows = sample_rows(nih.load_metadata(metadata), per_class, seed, single_finding)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    findings = rows[nih.FINDINGS].str.split("|")
    jobs = [(name, tuple(f), size, seed, str(images), not single_finding)
            for name, f in zip(rows[nih.IMAGE], findings)]
    workers = workers or os.cpu_count() or 1
    total = 0
    step = max(1, len(jobs) // 10)
    log.info("drawing %d images of %d² with %d processes into %s", len(jobs), size, workers, images)
    boxes: dict[str, list[tuple[str, float, float, float, float]]] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, (nbytes, found) in enumerate(pool.map(_write_one, jobs, chunksize=8), start=1):
            total += nbytes
            boxes[jobs[i - 1][0]] = found
            if i % step == 0 or i == len(jobs):
                log.info("synth: %d/%d images (%.0f%%)", i, len(jobs), 100.0 * i / len(jobs))
    nih.write_metadata(rows, out / "Data_Entry_2017.csv")
    write_boxes(boxes, out / BBOX_FILE)
    write_split_lists(rows, out, seed)
    seconds = time.perf_counter() - start
    return SynthResult(out=out, images=len(jobs), megabytes=total / 1e6, seconds=seconds)
