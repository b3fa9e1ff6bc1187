"""A shard set on disk, as training reads it: the layout ``cxr-ray prepare`` writes, opening
it with a one-line error for every way it can be unusable, a cohort's index table, one split
read into memory (:func:`read_split`), and the transform from a stored batch to model input.

Layout (``SHARDS`` = ``cxr-ray prepare --out``)::

    SHARDS/manifest.json                written last: present ⇔ the set is complete
    SHARDS/quarantine.csv               image_index,reason: every listed image not written
    SHARDS/images/part-00000.parquet …  one row per written image (each decoded once)
    SHARDS/cohorts/<Cohort>.parquet     image_index, image_id, patient_id, split, label
                                    (split: train / val / test, whole patients)
    SHARDS/.lock                        flock held while a prepare runs
    SHARDS/.staging-<pid>-<hex>/        a run in progress (cleaned by the next run)

Image shard columns: ``image_index`` (string), ``image_id`` (int64, see
:func:`cxr_ray.data.decode.image_id`), ``patient_id`` (int64), the 15 label columns named as
in :data:`cxr_ray.data.nih.LABELS` (bool), ``pixels`` (``fixed_size_binary[size*size]``: the
row-major uint8 ``size × size`` image — a flat binary column rather than a tensor extension
type, because it round-trips through any Parquet reader, ray#27116), ``reason`` (always null
here: the rows of the quarantine partition carry it), ``source_mode``, ``source_width``,
``source_height`` (what the file was).

Augmentation is *not* stored: the training rank calls :func:`model_batch`
(``augment.augment_by_id`` for train, ``augment.to_model_input`` for test) because it knows
the epoch; augmenting a uint8 batch in torch on the trainer's device is faster than a
separate step on the same CPU (bench/RESULTS.md). ``augment_on = "ray_data"`` moves the same
function into Ray Data tasks instead (:mod:`cxr_ray.ray_backend.data_feed`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cxr_ray import storage
from cxr_ray.data import cohorts, decode
from cxr_ray.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cxr_ray.data.augment import AugmentConfig

#: Bump when the shard layout or manifest schema changes incompatibly.
FORMAT_VERSION = 2  # 2: three splits (train/val/test)
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
IMAGES = "images"
COHORTS_DIR = "cohorts"
SPLITS = cohorts.SPLITS


def read_manifest(out: Path | storage.Location) -> dict[str, Any] | None:
    """The manifest of ``out`` (a local folder or a store location); None when there is
    none, {} when it is unreadable."""
    try:
        return json.loads((out / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as "other settings"


@dataclass(frozen=True)
class Shards:
    """A complete shard set, on disk or in an object store (see :func:`open_shards`)."""

    root: storage.Location
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def images_dir(self) -> storage.Location:
        return self.root / IMAGES

    def cohort_path(self, cohort: str) -> storage.Location:
        return self.root / COHORTS_DIR / f"{cohorts.resolve_cohort(cohort)}.parquet"


def open_shards(path: str | Path, expect_size: int | None = None) -> Shards:
    """Open a shard set (a local folder or a URI such as ``s3://bucket/shards``), or raise a
    :class:`UserError` that says how to make a usable one."""
    root = storage.locate(path)
    if not storage.is_uri(path) and not root.is_dir():
        raise UserError(f"{root}: no shard set there; make one with "
                        f"cxr-ray prepare --data DIR --out {root}")
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"{root} is not a complete shard set (no {MANIFEST}: a prepare is running "
                        f"or was interrupted); re-run cxr-ray prepare --data DIR --out {root}")
    if manifest.get("format_version") != FORMAT_VERSION or "size" not in manifest:
        raise UserError(f"{root}/{MANIFEST} is unreadable or of format "
                        f"{manifest.get('format_version')!r} (this cxr-ray reads {FORMAT_VERSION}); "
                        f"re-run cxr-ray prepare --force --out {root}")
    shards = Shards(root, manifest)
    if expect_size is not None and shards.size != expect_size:
        raise UserError(f"{root} was prepared for {shards.size}, asked for {expect_size}: "
                        f"re-run cxr-ray prepare --size {expect_size} (into another --out)")
    present = {f"{folder}/{name}" for folder in (IMAGES, COHORTS_DIR)
               for name in (root / folder).files()}  # one listing each, local or remote
    missing = [s["file"] for s in manifest.get("shards", []) if s["file"] not in present]
    missing += [f"{COHORTS_DIR}/{c}.parquet" for c in manifest.get("cohorts", {})
                if f"{COHORTS_DIR}/{c}.parquet" not in present]
    if missing:
        raise UserError(f"{root} is damaged: {len(missing)} file(s) listed in {MANIFEST} are "
                        f"missing, e.g. {missing[0]}; re-run cxr-ray prepare --force --out {root}")
    return shards


def cohort_table(shards: Shards | str | Path, cohort: str, split: str | None = None) -> pd.DataFrame:
    """The cohort's index table (image_index, image_id, patient_id, split, label)."""
    sh = shards if isinstance(shards, Shards) else open_shards(shards)
    path = sh.cohort_path(cohort)
    if not path.is_file():
        raise UserError(f"{sh.root} has no table for cohort {cohort!r}; re-run cxr-ray prepare")
    table = pq.read_table(path.path, filesystem=path.fs).to_pandas()
    if split is not None:
        if split not in SPLITS:
            raise UserError(f"split {split!r}: use one of {', '.join(SPLITS)}")
        table = table[table["split"] == split].reset_index(drop=True)
    return table


def model_batch(batch: dict[str, Any], split: str, *, epoch: int = 0, seed: int = 0,
                cfg: "AugmentConfig | None" = None,
                device: "torch.device | str | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A stream batch (from ``iter_torch_batches``) → ``(x, y)`` for the model.

    ``x`` float32 (N, 1, H, W) in [0, 1]; ``y`` float32 (N,).  The train split is
    augmented per image with :func:`cxr_ray.data.augment.augment_by_id` — parameters a pure
    function of ``(seed, epoch, image_id)``, so every epoch differs and any run can be
    reproduced — on ``device`` (the uint8 batch moves first, 4× less traffic than
    float).  The test split only goes through :func:`cxr_ray.data.augment.to_model_input`.
    """
    import torch

    from cxr_ray.data import augment

    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    images = torch.as_tensor(batch["image"])
    labels = torch.as_tensor(batch["label"]).to(torch.float32)
    if device is not None:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if split == "train":
        ids = torch.as_tensor(batch["image_id"])
        x = augment.augment_by_id(images, ids, seed=seed, epoch=epoch,
                                  cfg=cfg if cfg is not None else augment.AugmentConfig())
    else:
        x = augment.to_model_input(images)
    return x, labels


def train_transform(batch: dict[str, Any], *, epoch: int, seed: int = 0,
                    cfg: "AugmentConfig | None" = None,
                    device: "torch.device | str | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """:func:`model_batch` for the train split (augmented for ``epoch``)."""
    return model_batch(batch, "train", epoch=epoch, seed=seed, cfg=cfg, device=device)


def eval_transform(batch: dict[str, Any], *,
                   device: "torch.device | str | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """:func:`model_batch` for an evaluation split (never augmented)."""
    return model_batch(batch, "test", device=device)



def scan_split(shards: Shards, cohort: str, split: str, columns: list[str]
               ) -> tuple[pa.Table, np.ndarray]:
    """``columns`` (with ``image_id``) of one cohort split's rows of the image shards, in the
    shards' scan order, checked complete; and their float32 labels in the same order."""
    table = cohort_table(shards, cohort, split)
    ids = table["image_id"].to_numpy(np.int64)
    images = shards.images_dir
    data = pads.dataset(images.path, filesystem=images.fs, format="parquet").to_table(
        columns=columns, filter=pads.field("image_id").isin(pa.array(ids)))
    got = data.column("image_id").to_numpy()
    order = np.argsort(ids)
    where = order[np.searchsorted(ids, got, sorter=order).clip(0, len(ids) - 1)]
    if len(got) != len(ids) or not np.array_equal(ids[where], got) or len(set(got)) != len(got):
        raise UserError(f"{shards.root}: the {cohort} {split} split lists {len(ids)} images, "
                        f"the shards hold {len(set(got) & set(ids))} of them; re-run "
                        f"cxr-ray prepare --force --out {shards.root}")
    return data, table["label"].to_numpy(np.float32)[where]


def read_split(shards: Shards, cohort: str, split: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cohort split read in this process: uint8 images (n, H, W), image ids, float32
    labels, in the shards' scan order (:func:`scan_split`)."""
    data, labels = scan_split(shards, cohort, split, ["image_id", "pixels"])
    images = decode.pixels_to_numpy(data.column("pixels"), shards.size)
    return images, data.column("image_id").to_numpy().astype(np.int64), labels
