"""``prepare`` without Ray: plan the work (metadata, cohorts, the files on disk), lock the
output, check what the decode wrote, and publish a complete shard set atomically. The decode
itself runs as Ray Data tasks (:mod:`cxr_ray.ray_backend.ingest` passes it in).

Owns the manifest, the quarantine list, the lock and atomic publishing.
Decoding itself (formats, grey conversion, resize) lives in :mod:`cxr_ray.data.decode`;
cohorts in :mod:`cxr_ray.data.cohorts`; augmentation in :mod:`cxr_ray.data.augment`.

The shard layout and its columns are described in :mod:`cxr_ray.data.shards`.

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
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_ray import storage
from cxr_ray.data import cohorts, decode, nih
from cxr_ray.data.shards import (COHORTS_DIR, FORMAT_VERSION, IMAGES, MANIFEST, QUARANTINE,
                                 read_manifest)
from cxr_ray.errors import UserError


log = logging.getLogger(__name__)

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


# =========================================================================== prepare
@dataclass(frozen=True)
class PrepareConfig:
    """What ``cxr-ray prepare`` does; every field is a CLI flag."""

    data: Path
    """Data directory: the images anywhere below it (``images/*.png``, NIH's
    ``images_001/images/*.png``, ...), the metadata CSV and the official split lists."""
    out: Path | str
    """Shard directory (``SHARDS``), or an object-store URI (``s3://bucket/shards``)."""
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
        if not storage.is_uri(self.out):
            object.__setattr__(self, "out", Path(self.out))  # a local path given as str
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


#: ``(plan, parts_dir) -> {"cpus", "decode_seconds"}``: the Ray Data decode (see :func:`prepare`).
DecodeAndWrite = Callable[["PreparePlan", Path], dict[str, float]]


def decode_in_process(plan: "PreparePlan", parts: Path) -> dict[str, float]:
    """A :data:`DecodeAndWrite` without Ray: every job decoded in this process, written as
    Parquet partitioned on ``status``. For small sets (tests, benchmarks); the CLI's
    ``prepare`` decodes with Ray Data across the cluster."""
    started = time.perf_counter()
    jobs = pa.Table.from_pandas(plan.jobs, preserve_index=False)
    table = decode.decode_batch(jobs, size=plan.config.size)
    where = {"root_path": parts.path, "filesystem": parts.fs} \
        if isinstance(parts, storage.Location) else {"root_path": str(parts)}
    pq.write_to_dataset(table, **where, partition_cols=["status"], compression=COMPRESSION)
    return {"cpus": 1, "decode_seconds": time.perf_counter() - started}


@dataclass
class PreparePlan:
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


def prepare(config: PrepareConfig, decode_and_write: DecodeAndWrite) -> PrepareResult:
    """Decode every image the metadata lists into ``config.out`` (see the module docstring).

    ``decode_and_write(plan, parts_dir)`` decodes ``plan.jobs`` and writes Parquet
    partitioned on ``status`` into ``parts_dir`` (a local folder, or a
    :class:`~cxr_ray.storage.Location` in an object store), returning
    ``{"cpus", "decode_seconds"}``; it is called only when there is work to do.
    """
    start = time.perf_counter()
    plan = _plan(config)
    if storage.is_uri(config.out):
        return _prepare_remote(plan, decode_and_write, start)
    out = config.out
    with _locked(out):
        existing = read_manifest(out)
        if _up_to_date(out, existing, plan):
            return PrepareResult(out, existing, True, time.perf_counter() - start)
        staging = out / f"{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            ray_stats = decode_and_write(plan, staging / "parts")
            manifest = _assemble(plan, staging, ray_stats, start)
            _publish(out, staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    result = PrepareResult(out, manifest, False, time.perf_counter() - start)
    log.info("%s", result.summary())
    return result


def _up_to_date(out: Any, existing: dict[str, Any] | None, plan: PreparePlan) -> bool:
    """True when ``out`` holds this plan's set; a UserError when it holds other settings."""
    if existing is None or plan.config.force:
        return False
    if existing.get("settings") != plan.settings:
        raise UserError(_settings_mismatch(out, existing.get("settings") or {}, plan.settings))
    if existing.get("inputs_fingerprint") == plan.fingerprint:
        log.info("%s is up to date (same settings and inputs); --force rebuilds it", out)
        return True
    log.info("%s: inputs changed since it was prepared; rebuilding", out)
    return False


def _prepare_remote(plan: PreparePlan, decode_and_write: DecodeAndWrite,
                    start: float) -> PrepareResult:
    """``--out`` in an object store (no rename, no lock): the decode tasks write their
    Parquet parts to a staging prefix there (any node can); the driver checks and lays out
    the set in a local folder exactly as for a local ``--out``, then publishes it: the old
    manifest deleted first, the shards and tables uploaded, ``manifest.json`` last (readers
    only open a set whose manifest is there), stale files removed after. Two prepares into
    the same prefix at once are not detected: the last manifest wins."""
    remote = storage.locate(plan.config.out)
    storage.check_writable(remote)
    existing = read_manifest(remote)
    if _up_to_date(remote, existing, plan):
        return PrepareResult(remote, existing, True, time.perf_counter() - start)
    local = storage.cache_dir(str(plan.config.out)) / "prepare"
    shutil.rmtree(local, ignore_errors=True)
    parts = remote / f"{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    staging = local / "staging"
    staging.mkdir(parents=True)
    try:
        ray_stats = decode_and_write(plan, parts)
        for rel in parts.files():
            (parts / rel).download(staging / "parts" / rel)
        manifest = _assemble(plan, staging, ray_stats, start)
        built = local / "set"
        built.mkdir()
        for name in (IMAGES, COHORTS_DIR, QUARANTINE):
            os.replace(staging / "new" / name, built / name)
        (built / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (remote / MANIFEST).delete()  # from here until the end: incomplete
        storage.Mirror(remote, built, first=(IMAGES, COHORTS_DIR, QUARANTINE)).push()
    finally:
        parts.delete_tree()
        shutil.rmtree(local, ignore_errors=True)
    result = PrepareResult(remote, manifest, False, time.perf_counter() - start)
    log.info("%s", result.summary())
    return result


# --------------------------------------------------------------------------- planning
def _plan(config: PrepareConfig) -> PreparePlan:
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
                    "val_fraction": cc.val_fraction, "split": cc.split, "one_class_inliers": cc.one_class_inliers,
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
    return PreparePlan(config, metadata_path, jobs, built, scan.unlisted, scan.duplicates,
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


def _sha256(path: str | Path) -> str:
    """Hash of a file's bytes: which metadata table produced a shard set (and its splits)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- assembly
def _parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def _read_columns(files: list[Path], columns: list[str]) -> pa.Table:
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def _assemble(plan: PreparePlan, staging: Path, ray_stats: dict[str, float],
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
        pos = kept["label"] == 1
        cohort_counts[name] = {"positives": int(pos.sum()), "negatives": int((~pos).sum()),
                               "quarantined": int((~keep).sum())}
        for split in cohorts.SPLITS:
            part = kept["split"] == split
            cohort_counts[name][split] = int(part.sum())
            cohort_counts[name][f"{split}_positives"] = int((part & pos).sum())
            cohort_counts[name][f"{split}_patients"] = int(kept.loc[part, "patient_id"].nunique())

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
                   "metadata_sha256": _sha256(plan.metadata_path),
                   "split_seed": cfg.cohort.seed,
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


