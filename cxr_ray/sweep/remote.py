"""An experiment in an object store (``storage_path = "s3://bucket/prefix"``): who keeps which
part of it, through :class:`cxr_ray.storage.Mirror` (local copy, commit marker written last).

* the driver keeps the experiment's own files (recipe.json, data.json, sweep_log.jsonl,
  report/): :func:`experiment_mirror`, pushed after each change;
* each trial keeps its run directory and its LR range test's folder: :func:`run_mirror`,
  pushed after every epoch's checkpoint and once more when the trial has written
  ``trial.json`` (so a trial is finished exactly when its last commit lists trial.json);
* Tune keeps ``tune/`` itself (its ``storage_path`` is the URI: Ray syncs it);
* readers (report, status, predict) take a local copy of everything committed with
  :func:`pull_experiment`.

Local copies live under :func:`cxr_ray.storage.cache_dir` of the experiment's URI, at the same
path on every node, so a run's recorded paths (``init_from``) stay valid across resumes.
"""

from __future__ import annotations

from pathlib import Path

from cxr_ray import paths, storage

#: Folders below an experiment that other writers own (the driver's mirror leaves them).
OTHER_WRITERS = tuple(f"{name}/" for name in (*paths.STAGES, paths.LR_FIND_DIR, paths.TUNE_DIR))
#: Ray Train's own storage inside a run of an object-store experiment (its marker and state
#: files; cxr-ray's files and checkpoints are the run's, committed by rank 0).
RAY_TRAIN_DIR = ".ray_train"
#: What a report or status reader does not need from a run.
BULKY = (paths.CHECKPOINT_PREFIX, f"{paths.TB_DIR}/")


def experiment_mirror(uri: str) -> storage.Mirror:
    """The driver's part of the experiment ``uri``."""
    return storage.Mirror(storage.locate(uri), storage.cache_dir(uri), skip=OTHER_WRITERS)


def run_mirror(uri: str, relative: str, *, skip: tuple[str, ...] = ()) -> storage.Mirror:
    """One run (``stage1/<run>``) or LR range test (``lr_find/<run>``) folder of ``uri``."""
    return storage.Mirror(storage.locate(uri) / relative, storage.cache_dir(uri) / relative,
                          skip=skip)


def committed_runs(uri: str) -> list[str]:
    """Every run and LR range test folder of ``uri`` with a commit, relative to it."""
    names = storage.locate(uri).files()
    suffix = f"/{storage.SYNC_FILE}"
    return sorted(rel[:-len(suffix)] for rel in names
                  if rel.endswith(suffix) and rel.startswith(OTHER_WRITERS[:-1]))


def pull_experiment(uri: str, *, checkpoints: bool = False) -> Path:
    """A local copy of everything committed in the experiment ``uri`` (checkpoints only
    when asked; TensorBoard files never); its path."""
    experiment_mirror(uri).pull()
    skip = (f"{paths.TB_DIR}/",) if checkpoints else BULKY
    for rel in committed_runs(uri):
        run_mirror(uri, rel, skip=skip).pull()
    return storage.cache_dir(uri)


def pull_files(uri: str, relatives: list[str]) -> None:
    """Fetch single committed files of ``uri`` (e.g. the checkpoints predict selected)."""
    root = storage.locate(uri)
    local = storage.cache_dir(uri)
    for rel in relatives:
        target = local / rel
        if not target.is_file():
            (root / rel).download(target)


def committed_checkpoints(uri: str):
    """A ``kept_checkpoints`` for the local copy of ``uri`` that lists the checkpoints each
    run's last commit holds (fetched only when chosen: :func:`pull_files`)."""
    local = storage.cache_dir(uri)

    def kept(run_dir: Path) -> dict[int, Path]:
        rel = Path(run_dir).resolve().relative_to(local).as_posix()
        out = {}
        for name in run_mirror(uri, rel).committed():
            folder, _, file = name.partition("/")
            epoch = paths.checkpoint_epoch(Path(folder))
            if epoch is not None and file == paths.CHECKPOINT_FILE:
                out[epoch] = Path(run_dir) / name
        return dict(sorted(out.items()))

    return kept
