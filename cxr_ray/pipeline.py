"""Ray Data stage: ``prepare`` (decode every listed image once into Parquet shards) and the
training stream over those shards.

Owns the shard layout and its manifest, the quarantine list, atomic publishing, the Ray
session of the ``prepare`` command, and the per-cohort Ray Dataset that training reads.
Decoding itself (formats, grey conversion, resize) lives in :mod:`cxr_ray.data.decode`;
cohorts in :mod:`cxr_ray.data.cohorts`; augmentation in :mod:`cxr_ray.data.augment`.

Shard layout (``SHARDS`` = ``--out``)::

    SHARDS/manifest.json                written last: present ⇔ the set is complete
    SHARDS/quarantine.csv               image_index,reason: every listed image not written
    SHARDS/images/part-00000.parquet …  one row per written image (each decoded once)
    SHARDS/cohorts/<Cohort>.parquet     image_index, image_id, patient_id, split, label
    SHARDS/.lock                        flock held while a prepare runs
    SHARDS/.staging-<pid>-<hex>/        a run in progress (cleaned by the next run)

Image shard columns: ``image_index`` (string), ``image_id`` (int64, see
:func:`cxr_ray.data.decode.image_id`), ``patient_id`` (int64), the 15 label columns named as in
:data:`cxr_ray.data.nih.LABELS` (bool), ``pixels`` (``fixed_size_binary[size*size]``: the
row-major uint8 ``size × size`` image — a flat binary column rather than a tensor
extension type, because it round-trips through any Parquet reader, ray#27116), ``reason``
(always null here: the rows of the quarantine partition carry it), ``source_mode``,
``source_width``, ``source_height`` (what the file was).

How ``prepare`` works: the driver reads the metadata, builds the 15 cohorts (pure
pandas), and finds every listed file on disk (one directory walk, which also counts the
unlisted ones).  Ray Data then decodes the list in ``map_batches`` — a function that
never raises for a bad file but returns a status and a reason per row — and writes
Parquet partitioned on that status into a staging directory: ``status=ok`` becomes
``images/``, ``status=quarantined`` becomes ``quarantine.csv``.  So ``written +
quarantined == rows`` holds by construction, and the driver checks it (every listed
name exactly once) before anything is published.  Publishing removes the old manifest,
swaps the new directories in with renames, fsyncs, and writes the new manifest last
(temp file + ``os.replace``): a run killed at any point never leaves a set that looks
complete, and the next run cleans its staging directory and does the work again.

Re-running: same settings and inputs (metadata, split lists, every listed file's size
and mtime) → "up to date", nothing is decoded (``--force`` rebuilds).  Same settings,
changed inputs → rebuilt (the old set is stale).  Different settings (``--size``,
cohort options) → refused, since rebuilding would destroy a set someone may be
training on: pass ``--force`` or choose another ``--out``.

On a multi-node cluster ``--out`` (and ``--data``) must be storage that every node sees
at the same path (NFS or similar): the workers write the shards, the driver renames them.

Training stream: :func:`cohort_dataset` reads only ``image_id`` and ``pixels`` of the
image shards, filtered to the cohort split's ids with a predicate Ray pushes down into
the Parquet scan, joins the labels in ``map_batches`` and, for the train split, shuffles
globally with a new (reproducible) permutation every epoch.  Augmentation is *not* in the
dataset: the training worker calls :func:`model_batch` (``augment.augment_by_id`` for
train, ``augment.to_model_input`` for test), because it knows the epoch and, measured in
bench/RESULTS.md, augmenting a uint8 batch in torch is faster than a Ray Data
``map_batches`` step on the same CPU, and faster still on a GPU.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_ray.data import cohorts, decode, nih
from cxr_ray.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data
    import torch

    from cxr_ray.data.augment import AugmentConfig

log = logging.getLogger(__name__)

#: Bump when the shard layout or manifest schema changes incompatibly.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
IMAGES = "images"
COHORTS_DIR = "cohorts"
_LOCK = ".lock"
_STAGING = ".staging-"
_OURS = {MANIFEST, QUARANTINE, IMAGES, COHORTS_DIR, _LOCK}

#: Aim for shards of about this many bytes of pixels (before compression).
TARGET_SHARD_BYTES = 64 * 2**20
#: ``map_batches`` batches of about this many bytes of pixels.
TARGET_BATCH_BYTES = 16 * 2**20
#: Parquet compression of the shards: zstd is ~1.8× smaller than raw pixels at 224²
#: (snappy 1.6×) for ~0.5 ms/image of CPU, ~3 % of a 1024² PNG decode.
COMPRESSION = "zstd"
#: Files on disk that count as images when the metadata does not list them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm")
#: Metadata looked for in ``--data`` when ``--metadata`` is not given.
METADATA_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv",
                  "Data_Entry_2017.csv.gz", "Data_Entry_2017_v2020.csv.gz")
SPLITS = ("train", "test")


# =========================================================================== prepare
@dataclass(frozen=True)
class PrepareConfig:
    """What ``cxr-ray prepare`` does; every field is a CLI flag."""

    data: Path
    """Data directory: the images anywhere below it (``images/*.png``, NIH's
    ``images_001/images/*.png``, ...), the metadata CSV and the official split lists."""
    out: Path
    """Shard directory (``SHARDS``)."""
    size: int = 224
    """Side of the square training resolution, in pixels."""
    metadata: Path | None = None
    """NIH metadata CSV; default: the first of :data:`METADATA_NAMES` in ``data``, else
    the real table shipped in torchxrayvision."""
    cohort: cohorts.CohortConfig = field(default_factory=cohorts.CohortConfig)
    """How the 15 cohorts are drawn and split (``--negatives``, ``--seed``, ``--split`` ...)."""
    address: str | None = None
    """Ray cluster to use; default ``RAY_ADDRESS``, else a local Ray for the command."""
    force: bool = False
    """Rebuild even if ``out`` is up to date or was prepared with other settings."""
    shard_rows: int | None = None
    """At most this many images per shard; default: about 64 MB of pixels per shard."""
    throttle_s: float = 0.0
    """Testing aid: sleep this long per decoded batch (lets a test kill a run mid-way)."""

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 4096:
            raise UserError(f"--size {self.size}: must be between 8 and 4096 pixels")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise UserError(f"--shard-rows {self.shard_rows}: must be at least 1")


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    manifest: dict[str, Any]
    skipped: bool
    """True when ``out`` was already up to date and nothing was decoded."""
    seconds: float

    @property
    def quarantined(self) -> int:
        return int(self.manifest["quarantined"])

    @property
    def quarantine_path(self) -> Path:
        return self.out / QUARANTINE

    def summary(self) -> str:
        m = self.manifest
        head = (f"{self.out} is up to date" if self.skipped else
                f"prepared {m['rows']} listed images at {m['size']}² into {self.out} in "
                f"{self.seconds:.1f} s (decoding {m['decode_seconds']:.1f} s, "
                f"{m['rows'] / max(m['decode_seconds'], 1e-9):.1f} images/s on {m['ray_cpus']} CPUs)")
        return (f"{head}: written {m['written']}, quarantined {m['quarantined']}, "
                f"unlisted on disk {m['unlisted_on_disk']}; {len(m['cohorts'])} cohort tables")

    def quarantine_line(self) -> str:
        m = self.manifest
        kinds = ", ".join(f"{n} {k}" for k, n in m["quarantine_reasons"].items())
        return (f"{m['quarantined']} of {m['rows']} listed images quarantined ({kinds}); "
                f"see {self.quarantine_path}")


@dataclass
class _Plan:
    """Everything the driver knows before any pixel is decoded."""

    config: PrepareConfig
    metadata_path: str
    jobs: pd.DataFrame
    """One row per metadata row: image_index, image_id, patient_id, labels, path."""
    built: dict[str, pd.DataFrame]
    unlisted: int
    duplicates: int
    found: int
    settings: dict[str, Any]
    fingerprint: str


def prepare(config: PrepareConfig) -> PrepareResult:
    """Decode every image the metadata lists into ``config.out`` (see the module docstring).

    Starts (or connects to) Ray only when there is work to do; an already initialised
    Ray (e.g. a test's) is used as is.
    """
    start = time.perf_counter()
    plan = _plan(config)
    out = config.out
    with _locked(out):
        existing = _read_manifest(out)
        if existing is not None and not config.force:
            if existing.get("settings") != plan.settings:
                raise UserError(_settings_mismatch(out, existing.get("settings") or {},
                                                   plan.settings))
            if existing.get("inputs_fingerprint") == plan.fingerprint:
                log.info("%s is up to date (same settings and inputs); --force rebuilds it", out)
                return PrepareResult(out, existing, True, time.perf_counter() - start)
            log.info("%s: inputs changed since it was prepared; rebuilding", out)
        staging = out / f"{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            with ray_session(config.address):
                ray_stats = _decode_and_write(plan, staging / "parts")
            manifest = _assemble(plan, staging, ray_stats, start)
            _publish(out, staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    result = PrepareResult(out, manifest, False, time.perf_counter() - start)
    log.info("%s", result.summary())
    return result


# --------------------------------------------------------------------------- planning
def _plan(config: PrepareConfig) -> _Plan:
    data = Path(config.data)
    if not data.is_dir():
        raise UserError(f"--data {data}: no such directory; pass the data set directory "
                        "(e.g. the output of cxr-ray synth)")
    out = Path(config.out)
    if out.resolve() == data.resolve():
        raise UserError(f"--out {out} is the data directory; choose a separate shard directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    metadata_path = _metadata_path(config)
    meta = nih.load_metadata(metadata_path)
    built = cohorts.build_all(meta, config.cohort)  # errors (e.g. split lists) before decoding
    names = meta[nih.IMAGE].tolist()
    ids = np.fromiter((decode.image_id(n) for n in names), dtype=np.int64, count=len(names))
    _check_unique_ids(names, ids)
    scan = _scan(data, set(names), exclude=out)
    paths = [scan.paths.get(n, "") for n in names]
    jobs = pd.DataFrame({"image_index": names, "image_id": ids,
                         "patient_id": meta[nih.PATIENT].to_numpy(np.int64)})
    for label in nih.LABELS:
        jobs[label] = meta[label].to_numpy(bool)
    jobs["path"] = paths
    cc = config.cohort
    settings = {
        "format_version": FORMAT_VERSION,
        "size": config.size,
        "resize": decode.RESAMPLE_NAME,
        "cohorts": {"negatives": cc.negatives, "seed": cc.seed, "test_fraction": cc.test_fraction,
                    "split": cc.split, "one_class_inliers": cc.one_class_inliers,
                    "one_class_per_disease": cc.one_class_per_disease},
    }
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(meta[[nih.IMAGE, nih.FINDINGS, nih.PATIENT]],
                                        index=False).to_numpy().tobytes())
    for name in names:
        st = scan.stats.get(name)
        h.update(f"{name}\0{st[0] if st else -1}\0{st[1] if st else -1}\n".encode())
    if cc.split == "official":
        for part in cohorts.OFFICIAL_LISTS:
            h.update(Path(cc.split_dir, part).read_bytes())
    return _Plan(config, metadata_path, jobs, built, scan.unlisted, scan.duplicates,
                 len(scan.stats), settings, h.hexdigest())


def _metadata_path(config: PrepareConfig) -> str:
    if config.metadata is not None:
        return str(config.metadata)
    for name in METADATA_NAMES:
        candidate = Path(config.data) / name
        if candidate.is_file():
            return str(candidate)
    path = nih.packaged_metadata_path()
    log.warning("no metadata in %s (looked for %s); using the real NIH table %s: every image it "
                "lists that is not on disk will be quarantined as missing",
                config.data, ", ".join(METADATA_NAMES), path)
    return str(path)


def _check_unique_ids(names: list[str], ids: np.ndarray) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        pair = [names[i] for i in np.flatnonzero(ids == dup)[:2]]
        raise UserError(f"images {pair[0]!r} and {pair[1]!r} map to the same image id {dup}; "
                        "rename one of them")


@dataclass
class _Scan:
    paths: dict[str, str]
    stats: dict[str, tuple[int, int]]
    unlisted: int
    duplicates: int


def _scan(data: Path, listed: set[str], exclude: Path) -> _Scan:
    """Find the listed files below ``data`` (by file name, first in sorted order wins)."""
    paths: dict[str, str] = {}
    stats: dict[str, tuple[int, int]] = {}
    unlisted = duplicates = 0
    skip = {Path(exclude).resolve()}
    seen: set[Path] = set()
    stack = [data.resolve()]
    while stack:
        folder = stack.pop()
        if folder in seen or folder in skip:
            continue
        seen.add(folder)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s (%s); its files count as missing", folder, exc)
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    subdirs.append(Path(entry.path).resolve())
                    continue
            except OSError:
                continue
            if entry.name in listed:
                if entry.name in paths:
                    duplicates += 1
                    continue
                paths[entry.name] = entry.path
                try:
                    st = entry.stat()
                    stats[entry.name] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stats[entry.name] = (-1, -1)
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                unlisted += 1
        stack.extend(reversed(subdirs))
    # Names with a directory part ("sub/x.png") are looked up relative to data.
    for name in listed:
        if name not in paths and "/" in name and (data / name).is_file():
            paths[name] = str(data / name)
            st = (data / name).stat()
            stats[name] = (st.st_size, st.st_mtime_ns)
    if duplicates:
        log.warning("%d listed file name(s) occur more than once below %s; the first in sorted "
                    "path order is used", duplicates, data)
    return _Scan(paths, stats, unlisted, duplicates)


# --------------------------------------------------------------------------- Ray
@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Use the initialised Ray, else connect to ``address``/``RAY_ADDRESS``, else start a
    local Ray (no dashboard) for the duration; disconnect/shut down what was started here."""
    import ray  # Ray-specific

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        try:
            ray.init(address=address)
        except (ConnectionError, TimeoutError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at {address} ({exc}); check "
                            "--address / RAY_ADDRESS, or leave both unset for a local Ray") from None
    else:
        ray.init(address="local", include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _decode_and_write(plan: _Plan, parts: Path) -> dict[str, float]:
    """Ray Data: decode every row once and write Parquet partitioned on status.

    Returns the CPUs used and the seconds the Ray Data execution took."""
    import ray  # Ray-specific from here to the end of the function

    size = plan.config.size
    rows = len(plan.jobs)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    shard_rows = plan.config.shard_rows or max(1, TARGET_SHARD_BYTES // (size * size))
    # At least four blocks per CPU: tasks of a few seconds balance the load to the end even
    # when some cores are slower or busy (measured: 4 → 8 → 16 blocks for 1,152 images on
    # 2 busy cores gave 40 → 50 → 54 images/s); the data decides above that.
    n_blocks = min(rows, max(math.ceil(rows / shard_rows), 4 * cpus))
    bounds = np.linspace(0, rows, n_blocks + 1).round().astype(int)
    chunks = [plan.jobs.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    # Ray Data bundles input blocks until a bundle holds `batch_size` rows: keep it at most
    # the smallest block, so that every block is its own task (and its own shard).
    smallest = min(len(c) for c in chunks)
    batch_size = max(1, min(smallest, TARGET_BATCH_BYTES // (size * size)))
    log.info("decoding %d images into %d shards at %d² on %d CPUs", rows, len(chunks), size, cpus)
    started = time.perf_counter()
    ds = ray.data.from_pandas(chunks)
    ds = ds.map_batches(decode.decode_batch, batch_format="pyarrow", batch_size=batch_size,
                        fn_kwargs={"size": size, "throttle_s": plan.config.throttle_s})
    ds.write_parquet(
        str(parts), partition_cols=["status"], compression=COMPRESSION,
        row_group_size=batch_size, use_dictionary=["source_mode"],
        write_statistics=["image_id", "patient_id"],
    )
    return {"cpus": cpus, "decode_seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- assembly
def _parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def _read_columns(files: list[Path], columns: list[str]) -> pa.Table:
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def _assemble(plan: _Plan, staging: Path, ray_stats: dict[str, float],
              start: float) -> dict[str, Any]:
    """Check the written rows, lay out ``staging/new`` and return the manifest."""
    parts = staging / "parts"
    new = staging / "new"
    (new / IMAGES).mkdir(parents=True)
    (new / COHORTS_DIR).mkdir()
    ok_files = _parquet_files(parts / "status=ok")
    bad_files = _parquet_files(parts / "status=quarantined")
    ok = _read_columns(ok_files, ["image_index", "source_mode", "source_width", "source_height"])
    bad = _read_columns(bad_files, ["image_index", "reason"])
    written = ok.column("image_index").to_pylist()
    bad_names = bad.column("image_index").to_pylist()
    listed = plan.jobs["image_index"].tolist()
    got = Counter(written) + Counter(bad_names)
    if len(written) + len(bad_names) != len(listed) or set(got) != set(listed) \
            or max(got.values(), default=1) != 1:
        raise RuntimeError(  # a bug, never a user error: nothing is published
            f"prepare produced {len(written)} written + {len(bad_names)} quarantined rows for "
            f"{len(listed)} listed images ({len(set(listed) - set(got))} missing, "
            f"{sum(1 for v in got.values() if v > 1)} duplicated); the shard set was not published")

    shards = []
    for i, f in enumerate(ok_files):
        target = new / IMAGES / f"part-{i:05d}.parquet"
        os.replace(f, target)
        shards.append({"file": f"{IMAGES}/{target.name}", "rows": pq.read_metadata(target).num_rows,
                       "bytes": target.stat().st_size})

    reasons = dict(zip(bad_names, bad.column("reason").to_pylist()))
    order = [n for n in listed if n in reasons]  # metadata order
    with open(new / QUARANTINE, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_index", "reason"])
        w.writerows([n, reasons[n]] for n in order)
    kinds = Counter(decode.reason_kind(reasons[n]) for n in order)

    quarantined = set(bad_names)
    ids = dict(zip(plan.jobs["image_index"], plan.jobs["image_id"]))
    cohort_counts = {}
    for name, frame in plan.built.items():
        keep = ~frame["image_index"].isin(quarantined)
        kept = frame[keep]
        table = pa.table({
            "image_index": pa.array(kept["image_index"].tolist(), pa.string()),
            "image_id": pa.array(kept["image_index"].map(ids).to_numpy(np.int64)),
            "patient_id": pa.array(kept["patient_id"].to_numpy(np.int64)),
            "split": pa.array(kept["split"].tolist(), pa.string()),
            "label": pa.array(kept["label"].to_numpy(np.int8)),
        })
        pq.write_table(table, new / COHORTS_DIR / f"{name}.parquet", compression=COMPRESSION)
        train, test = kept["split"] == "train", kept["split"] == "test"
        pos = kept["label"] == 1
        cohort_counts[name] = {
            "train": int(train.sum()), "test": int(test.sum()),
            "positives": int(pos.sum()), "negatives": int((~pos).sum()),
            "train_positives": int((train & pos).sum()), "test_positives": int((test & pos).sum()),
            "quarantined": int((~keep).sum()),
        }

    modes = Counter(ok.column("source_mode").to_pylist())
    widths = np.asarray(ok.column("source_width").to_pylist(), dtype=np.int64)
    heights = np.asarray(ok.column("source_height").to_pylist(), dtype=np.int64)
    sizes = Counter(f"{w}x{h}" for w, h in zip(widths.tolist(), heights.tolist()))
    cfg = plan.config
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cxr_ray_version": _version(),
        "source": {"data": str(Path(cfg.data).resolve()), "metadata": plan.metadata_path,
                   "split_dir": str(cfg.cohort.split_dir) if cfg.cohort.split_dir else None},
        "settings": plan.settings,
        "inputs_fingerprint": plan.fingerprint,
        "size": cfg.size,
        "pixels": {"column": "pixels", "dtype": "uint8", "shape": [cfg.size, cfg.size],
                   "storage": f"fixed_size_binary[{cfg.size * cfg.size}], row-major",
                   "resize": decode.RESAMPLE_NAME,
                   "gray": "L kept; colour → PIL L (601-2 luma), alpha dropped; 16-bit scaled "
                           "by 255/65535; non-square stretched"},
        "rows": len(listed),
        "written": len(written),
        "quarantined": len(bad_names),
        "quarantine_reasons": {k: kinds[k] for k in decode.REASON_KINDS if kinds[k]},
        "unlisted_on_disk": plan.unlisted,
        "duplicates_on_disk": plan.duplicates,
        "found_on_disk": plan.found,
        "converted": {m: n for m, n in sorted(modes.items()) if m != "L"},
        "resized_non_square": int((widths != heights).sum()),
        "source_sizes": dict(sizes.most_common(10)),
        "cohorts": cohort_counts,
        "shards": shards,
        "compression": COMPRESSION,
        "ray_cpus": int(ray_stats["cpus"]),
        "decode_seconds": round(ray_stats["decode_seconds"], 3),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cxr-ray")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"


# --------------------------------------------------------------------------- publishing
@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` and clean what a killed run left; refuse a foreign directory."""
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in _OURS and not p.name.startswith((_STAGING, MANIFEST + ".")))
    if foreign and not (out / MANIFEST).exists() and not (out / IMAGES).exists():
        raise UserError(f"--out {out} is not empty and is not a cxr-ray shard set "
                        f"(it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); "
                        "choose a new or empty directory")
    with open(out / _LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another cxr-ray prepare is writing to {out}; wait for it to "
                            "finish or choose another --out") from None
        for stale in out.iterdir():  # we hold the lock: whoever wrote these is gone
            if stale.name.startswith(_STAGING):
                log.info("removing %s left by an interrupted run", stale)
                shutil.rmtree(stale, ignore_errors=True)
            elif stale.name.startswith(MANIFEST + "."):
                stale.unlink(missing_ok=True)
        yield


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as "other settings"


def _settings_mismatch(out: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                diffs += [f"{key}.{k} {old[key].get(k)!r} → {new[key].get(k)!r}"
                          for k in sorted(set(old[key]) | set(new[key]))
                          if old[key].get(k) != new[key].get(k)]
            else:
                diffs.append(f"{key} {old.get(key)!r} → {new.get(key)!r}")
    return (f"{out} holds shards prepared with other settings ({'; '.join(diffs)}); "
            "pass --force to replace them, or choose another --out")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(out: Path, staging: Path, manifest: dict[str, Any]) -> None:
    """Swap ``staging/new`` into ``out``; the manifest goes last (see the module docstring)."""
    new, trash = staging / "new", staging / "old"
    trash.mkdir()
    for f in [*(new / IMAGES).iterdir(), *(new / COHORTS_DIR).iterdir(), new / QUARANTINE]:
        _fsync(f)
    (out / MANIFEST).unlink(missing_ok=True)  # from here until the end: incomplete
    _fsync(out)
    for name in (IMAGES, COHORTS_DIR, QUARANTINE):
        if (out / name).exists():
            os.replace(out / name, trash / name)
        os.replace(new / name, out / name)
    for name in (IMAGES, COHORTS_DIR):
        _fsync(out / name)
    tmp = out / f"{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / MANIFEST)
    _fsync(out)


# =========================================================================== the stream
@dataclass(frozen=True)
class Shards:
    """A complete shard set on disk (see :func:`open_shards`)."""

    root: Path
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES

    def cohort_path(self, cohort: str) -> Path:
        return self.root / COHORTS_DIR / f"{cohorts.resolve_cohort(cohort)}.parquet"


def open_shards(path: str | Path, expect_size: int | None = None) -> Shards:
    """Open a shard set, or raise a :class:`UserError` that says how to make a usable one."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: no shard set there; make one with "
                        f"cxr-ray prepare --data DIR --out {root}")
    manifest = _read_manifest(root)
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
    missing = [s["file"] for s in manifest.get("shards", []) if not (root / s["file"]).is_file()]
    missing += [f"{COHORTS_DIR}/{c}.parquet" for c in manifest.get("cohorts", {})
                if not (root / COHORTS_DIR / f"{c}.parquet").is_file()]
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
    table = pq.read_table(path).to_pandas()
    if split is not None:
        if split not in SPLITS:
            raise UserError(f"split {split!r}: use 'train' or 'test'")
        table = table[table["split"] == split].reset_index(drop=True)
    return table


def _stream_batch(batch: pa.Table, *, ids: np.ndarray, labels: np.ndarray,
                  size: int) -> dict[str, np.ndarray]:
    """``map_batches``: pixels → uint8 (n, size, size) ``image``; the cohort label joined by id."""
    image_ids = batch.column("image_id").to_numpy()
    if len(image_ids) == 0:
        return {"image": np.zeros((0, size, size), np.uint8),
                "image_id": np.zeros(0, np.int64), "label": np.zeros(0, np.float32)}
    where = np.searchsorted(ids, image_ids)
    where = np.minimum(where, len(ids) - 1)
    if not np.array_equal(ids[where], image_ids):
        raise RuntimeError("cohort stream received an image that is not in the cohort split")
    return {"image": decode.pixels_to_numpy(batch.column("pixels"), size).copy(),
            "image_id": image_ids.astype(np.int64), "label": labels[where]}


def cohort_dataset(shards: Shards | str | Path, cohort: str, split: str, *,
                   expect_size: int | None = None, shuffle: str | None = None,
                   seed: int = 0, materialize: bool = False) -> "ray.data.Dataset":
    """A Ray Dataset of one cohort split: ``image`` uint8 (H, W), ``image_id`` int64,
    ``label`` float32; every image of the split exactly once per pass.

    ``shuffle``: ``"global"`` (default for train) permutes all rows with
    ``random_shuffle``, a new permutation every epoch that is still reproducible from
    ``seed``: the metadata (hence the shards) is ordered by patient, so without a real
    shuffle a batch would hold one patient's follow-ups and one label.  ``"blocks"``
    only randomises the block order (cheaper; pair it with ``iter_torch_batches(
    local_shuffle_buffer_size=...)``); ``"none"`` (default for test) keeps file order.
    The test split is never augmented: augmentation is applied by :func:`model_batch`.

    ``materialize=True`` reads and filters once, here, and keeps the split's pixels in
    Ray's object store (``size²`` bytes per image: 1.2 GB for Atelectasis' 23,559 images
    at 224²); every epoch then only shuffles in memory instead of scanning all shards
    again.  The default streams from Parquet each epoch (no memory held between epochs).
    """
    import ray  # Ray-specific from here to the end of the function
    from ray.data import RandomSeedConfig
    from ray.data.expressions import col

    sh = shards if isinstance(shards, Shards) else open_shards(shards, expect_size)
    if expect_size is not None and sh.size != expect_size:
        open_shards(sh.root, expect_size)  # raises the size message
    if split not in SPLITS:
        raise UserError(f"split {split!r}: use 'train' or 'test'")
    shuffle = shuffle or ("global" if split == "train" else "none")
    if shuffle not in ("global", "blocks", "none"):
        raise UserError(f"shuffle {shuffle!r}: use 'global', 'blocks' or 'none'")
    if not sh.manifest.get("written"):
        raise UserError(f"{sh.root} holds no images (all {sh.manifest.get('rows')} listed were "
                        f"quarantined, see {sh.root / QUARANTINE}); fix the data and re-run prepare")
    table = cohort_table(sh, cohort, split)
    order = np.argsort(table["image_id"].to_numpy(np.int64), kind="stable")
    ids = table["image_id"].to_numpy(np.int64)[order]
    labels = table["label"].to_numpy(np.float32)[order]
    ds = (ray.data.read_parquet(str(sh.images_dir))
          .select_columns(["image_id", "pixels"])
          .filter(expr=col("image_id").is_in(ids.tolist())))  # pushed into the Parquet scan
    ds = ds.map_batches(_stream_batch, batch_format="pyarrow",
                        fn_kwargs={"ids": ids, "labels": labels, "size": sh.size})
    if materialize:
        ds = ds.materialize()  # the fixed work, once; the shuffle below still runs per epoch
    seeded = RandomSeedConfig(seed=seed, reseed_after_execution=True)
    if shuffle == "global":
        ds = ds.random_shuffle(seed=seeded)
    elif shuffle == "blocks":
        ds = ds.randomize_block_order(seed=seeded)
    return ds


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
        raise ValueError(f"split {split!r}: use 'train' or 'test'")
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
    """:func:`model_batch` for the test split (never augmented)."""
    return model_batch(batch, "test", device=device)


__all__ = [
    "FORMAT_VERSION", "PrepareConfig", "PrepareResult", "Shards", "cohort_dataset",
    "cohort_table", "eval_transform", "model_batch", "open_shards", "prepare", "ray_session",
    "train_transform",
]
