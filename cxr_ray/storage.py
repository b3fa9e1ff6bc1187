"""Where cxr-ray keeps files: a local directory, or any URI pyarrow's filesystems accept
(``s3://bucket/prefix``, ``gs://…``), through the same ``pyarrow.fs`` layer Ray uses for
``storage_path``.

Object stores have no append and no atomic rename; a single PUT is atomic. So cxr-ray never
edits a remote file in place. A process that writes a directory (a trial its run, the driver
its experiment files, ``prepare`` a shard set) works in a local copy, a :class:`Mirror`, and
publishes it with :meth:`Mirror.push`: changed files first, then ``.cxr-ray-sync.json``, the
list of the files that make up the directory, written **last** as the commit marker; files
it no longer lists are deleted after it. :meth:`Mirror.pull` makes the local copy equal to
the last commit: it fetches what that list names and removes local files it does not name,
so what a killed writer uploaded after its last commit is never read (a run resumes from its
last committed checkpoint). TensorBoard's event files are written locally and reach the store
with every push.

The endpoint of an S3-compatible store comes from ``AWS_ENDPOINT_URL`` or the URI
(``s3://bucket/prefix?endpoint_override=host:port&scheme=http``); credentials from the usual
AWS chain (environment, ``~/.aws``, instance profile).

Local copies live under ``$CXR_RAY_CACHE`` (default ``~/.cache/cxr-ray``), at a path made
from the URI, the same on every node with the same home layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from cxr_ray.errors import UserError

#: The commit marker of a mirrored directory (written last by :meth:`Mirror.push`).
SYNC_FILE = ".cxr-ray-sync.json"
CACHE_ENV = "CXR_RAY_CACHE"
_CHUNK = 8 * 2**20


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` other than ``file://`` (a remote store)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


#: URI schemes pyarrow's filesystems open (``FileSystem.from_uri``).
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def join(location: str | os.PathLike[str], *names: str) -> str:
    """``location/name/…`` for a local path or a URI, keeping a URI's ``?query`` (its
    endpoint settings) at the end."""
    head, sep, query = str(location).partition("?") if is_uri(location) else \
        (str(location), "", "")
    return "/".join([head.rstrip("/"), *(n.strip("/") for n in names)]) + sep + query


def check_uri(text: str, what: str) -> None:
    """A one-line error unless ``text`` is a URI of a store pyarrow can open (checked
    without touching the network)."""
    parts = urlsplit(str(text))
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise UserError(f"{what} {text!r}: not a storage URI cxr-ray can open; use a local "
                        f"path or {parts.scheme if parts.scheme in SCHEMES else 's3'}://BUCKET/"
                        f"PREFIX (schemes: {', '.join(SCHEMES)})")


_FILESYSTEMS: dict[str, pafs.FileSystem] = {}
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


@dataclass(frozen=True)
class Location:
    """A file or folder in a store: ``fs`` and the path in it, plus the URI it came from
    (without its query) for messages."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def __truediv__(self, name: str) -> "Location":
        name = str(name).strip("/")
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}",
                        f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    # -------------------------------------------------------------- reading
    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as fh:
            return fh.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        """The JSON there, or None when it is missing or unreadable."""
        try:
            return json.loads(self.read_bytes())
        except (OSError, ValueError):
            return None

    def files(self) -> dict[str, pafs.FileInfo]:
        """Every file below this folder, by path relative to it (none when it is missing)."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        base = self.path.rstrip("/") + "/"
        return {i.path[len(base):]: i for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File and i.path.startswith(base)}

    def download(self, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        with self.fs.open_input_stream(self.path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp, local)

    # -------------------------------------------------------------- writing (one PUT each)
    def write_bytes(self, data: bytes) -> None:
        self.fs.create_dir(_parent(self.path), recursive=True)
        with self.fs.open_output_stream(self.path) as fh:
            fh.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, local: Path) -> None:
        self.fs.create_dir(_parent(self.path), recursive=True)
        with open(local, "rb") as src, self.fs.open_output_stream(self.path) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        if self.info().type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else path


def locate(uri: str | os.PathLike[str]) -> Location:
    """The :class:`Location` of a URI or local path; a one-line error when pyarrow cannot
    open the store (unknown scheme, no bucket)."""
    text = str(uri)
    if not is_uri(text):
        path = Path(text.removeprefix("file://")).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), str(path), str(path))
    check_uri(text, "location")
    parts = urlsplit(text)
    # One filesystem object per bucket and settings (an S3 client is not free to make); the
    # path in a bucket store is bucket/key. Other schemes resolve every time.
    key = f"{parts.scheme}://{parts.netloc}?{parts.query}|{os.environ.get('AWS_ENDPOINT_URL')}"
    try:
        fs = _FILESYSTEMS.get(key) if parts.scheme in _BUCKET_SCHEMES else None
        if fs is None:
            fs, path = pafs.FileSystem.from_uri(text)
            if parts.scheme in _BUCKET_SCHEMES:
                _FILESYSTEMS[key] = fs
        else:
            path = f"{parts.netloc}{parts.path}"
    except (ValueError, OSError) as exc:
        raise UserError(f"{text}: not a storage URI cxr-ray can open ({exc}); use a local "
                        "path or s3://bucket/prefix (gs://, hdfs:// as pyarrow supports)"
                        ) from None
    display = f"{parts.scheme}://{path.rstrip('/')}"
    return Location(fs, path.rstrip("/"), display)


def check_writable(location: Location) -> None:
    """Write and delete a probe below ``location``: a missing bucket, wrong credentials or an
    unreachable endpoint fail here, in one line, before any work is done."""
    probe = location / f".cxr-ray-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.delete()
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"cannot write to {location}: {first.rstrip('.')}; check that the "
                        "bucket exists, the credentials (AWS_ACCESS_KEY_ID/…, ~/.aws, instance "
                        "profile) and the endpoint (AWS_ENDPOINT_URL or ?endpoint_override=)"
                        ) from None


def cache_dir(uri: str) -> Path:
    """The local copy of the remote folder ``uri`` (stable: same URI, same path)."""
    parts = urlsplit(str(uri))
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cxr-ray").expanduser()
    safe = re.sub(r"[^A-Za-z0-9._/-]", "_", f"{parts.netloc}{parts.path}").strip("/")
    tag = hashlib.sha256(str(uri).encode()).hexdigest()[:8]  # query and scheme differ
    return (root / "mirrors" / parts.scheme / f"{safe}-{tag}").resolve()


def local_path(location: str | os.PathLike[str]) -> Path:
    """Where cxr-ray reads and writes ``location`` with plain file I/O: the directory itself
    when it is local, else its :func:`cache_dir`."""
    return cache_dir(str(location)) if is_uri(location) else \
        Path(str(location).removeprefix("file://")).expanduser().resolve()


# --------------------------------------------------------------------------- mirrors
def _local_files(root: Path, skip: Iterable[str]) -> dict[str, os.stat_result]:
    skip = tuple(skip)
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name == SYNC_FILE or name.endswith(".tmp"):
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if not rel.startswith(skip):
                out[rel] = full.stat()
    return out


class Mirror:
    """A local directory kept as a copy of a remote folder (see the module docstring).

    ``skip``: relative path prefixes neither pushed nor pulled (another writer's sub-folders,
    e.g. the runs below an experiment). ``first``: prefixes uploaded before everything else
    (checkpoints, so that the files that describe them never arrive before them)."""

    def __init__(self, remote: Location, local: Path, *, skip: Iterable[str] = (),
                 first: Iterable[str] = ("checkpoint_",)) -> None:
        self.remote, self.local = remote, Path(local)
        self.skip, self.first = tuple(skip), tuple(first)
        self.writer = secrets.token_hex(8)
        self._committed: dict[str, dict[str, int]] | None = None
        self._seen: str | None = None  # the writer of the commit read last

    def committed(self) -> dict[str, dict[str, int]]:
        """The files of the remote folder's last commit (none when it has none)."""
        if self._committed is None:
            data = (self.remote / SYNC_FILE).read_json() or {}
            self._committed = dict(data.get("files", {}))
            self._seen = data.get("writer")
        return self._committed

    def refresh(self) -> None:
        """Take the remote folder's current commit as the one to build on (its owner hands
        the folder back after another process, e.g. a Ray Train rank 0, committed to it)."""
        self._committed = None

    def pull(self, only: Iterable[str] | None = None) -> bool:
        """Make the local copy equal to the last commit (``only``: just these prefixes);
        False when the remote folder has never been committed."""
        self._committed = None
        files = self.committed()
        want = {rel: rec for rel, rec in files.items()
                if not rel.startswith(self.skip)
                and (only is None or rel.startswith(tuple(only)))}
        self.local.mkdir(parents=True, exist_ok=True)
        have = _local_files(self.local, self.skip)
        for rel, st in have.items():
            if only is not None and not rel.startswith(tuple(only)):
                continue
            if rel not in want:
                (self.local / rel).unlink()
        for rel, rec in want.items():
            st = have.get(rel)
            if st is not None and st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]:
                continue
            target = self.local / rel
            (self.remote / rel).download(target)
            os.utime(target, ns=(rec["mtime_ns"], rec["mtime_ns"]))
        return bool(files)

    def push(self) -> int:
        """Upload what changed, commit, delete what the commit no longer lists; the number
        of files uploaded.

        Fencing: a writer whose folder has been committed by another writer since it last
        read or wrote the commit (a resumed run, while this one was presumed dead) stops with
        :class:`TakenOver` instead of overwriting the newer commit."""
        self.committed()
        current = (self.remote / SYNC_FILE).read_json() or {}
        if current.get("writer") not in (None, self.writer, self._seen):
            raise TakenOver(f"{self.remote} was committed by another writer since this one "
                            "last read it (a resumed or retried run); this one stops")
        old = dict(current.get("files", {}))
        have = _local_files(self.local, self.skip)
        new = {rel: {"size": st.st_size, "mtime_ns": st.st_mtime_ns} for rel, st in have.items()}
        changed = sorted(rel for rel, rec in new.items() if old.get(rel) != rec)
        early = [rel for rel in changed if rel.startswith(self.first)]
        for group in (early, [rel for rel in changed if rel not in set(early)]):
            # Each group's files travel in parallel (a request's latency, not its bytes,
            # dominates small files); the checkpoints' group has landed before the next.
            with ThreadPoolExecutor(max_workers=min(8, len(group) or 1)) as pool:
                list(pool.map(lambda rel: (self.remote / rel).upload(self.local / rel), group))
        if changed or set(old) != set(new) or current.get("writer") != self.writer:
            (self.remote / SYNC_FILE).write_text(json.dumps(
                {"files": new, "time": time.time(), "writer": self.writer}, indent=1,
                sort_keys=True))
        for rel in set(old) - set(new):
            (self.remote / rel).delete()
        self._committed, self._seen = new, self.writer
        return len(changed)


class TakenOver(RuntimeError):
    """Another writer committed to a mirrored folder under this one (see :meth:`Mirror.push`)."""
