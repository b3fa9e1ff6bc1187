"""The ``cxr-ray`` commands that read a finished (or running) experiment: ``report``,
``predict`` and ``status``, and the argument types for paths that may be object-store URIs.
(:mod:`cxr_ray.cli` registers them; the split keeps both modules readable.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxr_ray import storage
from cxr_ray.errors import UserError


# --------------------------------------------------------------------------- paths
def location(text: str) -> Path | str:
    """A local path, or an object-store URI kept as written (``s3://bucket/prefix``)."""
    return text if storage.is_uri(text) else Path(text)


def local_dir(text: str) -> Path:
    """A local path; a URI is refused in one line (only a sweep's ``storage_path``,
    ``--experiment`` and shard sets live in object stores)."""
    if storage.is_uri(text):
        raise argparse.ArgumentTypeError(
            f"{text}: a local path here; object stores hold shard sets (prepare --out) and "
            "sweep experiments (storage_path = \"s3://...\" in the recipe)")
    return Path(text)


def local_experiment(experiment: Path | str) -> Path:
    """An experiment directory to read: itself, or a local copy of what an object-store
    experiment has committed (no checkpoints)."""
    if storage.is_uri(experiment):
        from cxr_ray import paths
        from cxr_ray.sweep import remote

        local = remote.pull_experiment(str(experiment))
        if not (local / paths.RECIPE_FILE).is_file():
            raise UserError(f"{experiment}: no cxr-ray experiment committed there (no "
                            f"{paths.RECIPE_FILE}); pass storage_path/name of a sweep's recipe")
        return local
    return Path(experiment)


# --------------------------------------------------------------------------- commands
def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="results.csv, report.md and plots for an experiment directory",
        description="Which policy reaches which accuracy, in how many epochs and how much "
        "compute: the study's Tables 5, 7, 8 (and 6) side by side with ours.",
    )
    p.add_argument("--experiment", type=location, required=True,
                   help="the sweep's experiment dir (or its s3:// URI)")
    p.add_argument("--target", default=None,
                   help="target accuracy: a fraction (0.8), 'constant' or 'stage1' "
                        "(default: the recipe's, else 'constant')")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from cxr_ray.sweep import report

    experiment = local_experiment(args.experiment)
    target = args.target
    if target is None:
        stored = experiment / "recipe.json"
        target = (json.loads(stored.read_text())["experiment"].get("target", "constant")
                  if stored.is_file() else "constant")
    elif target not in ("constant", "stage1"):
        try:
            target = float(target)
        except ValueError:
            raise UserError(f"--target {target!r}: a fraction like 0.8, 'constant' or "
                            "'stage1'") from None
        if not 0 < target <= 1:
            raise UserError(f"--target {target}: a fraction in (0, 1], e.g. 0.8 for 80 %")
    path = report.write_report(experiment, target=target)
    if storage.is_uri(args.experiment):
        from cxr_ray.sweep import remote

        remote.experiment_mirror(str(args.experiment)).push()
        print(f"report: {args.experiment}/report/report.md (local copy: {path})")
    else:
        print(f"report: {path}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="apply an experiment's trained classifiers to new X-rays (PNG or DICOM)",
        description="For each image: every cohort's probability from that cohort's "
        "validation-selected checkpoint, the decision at its validation-chosen threshold, the "
        "one-class model's anomaly score, and where each number came from; unreadable files "
        "get a row with the reason. With an NIH Data_Entry_2017*.csv beside the images, also "
        "per-cohort accuracy and AUC with patient-bootstrap CIs (OUT.metrics.csv). Example: "
        "cxr-ray predict --experiment demo-run/experiments/demo --images "
        "demo-run/data/images --out preds.csv --heatmaps heatmaps",
    )
    p.add_argument("--experiment", type=location, required=True,
                   help="the sweep's experiment dir (or its s3:// URI)")
    p.add_argument("--images", type=Path, required=True,
                   help="a directory of images (PNG, DICOM; recursive) or a text file listing "
                        "one path per line")
    p.add_argument("--out", type=local_dir, required=True, help="the predictions CSV to write")
    p.add_argument("--cohorts", nargs="+", default=None,
                   help="cohorts to predict (default: every cohort the experiment trained)")
    p.add_argument("--heatmaps", type=Path, default=None,
                   help="directory for Grad-CAM overlay PNGs (one per image and heatmap cohort)")
    p.add_argument("--heatmap-cohorts", nargs="+", default=None,
                   help="cohorts to draw heatmaps for (default: every predicted cohort)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    p.add_argument("--launcher", choices=["ray", "process"], default="ray",
                   help="ray: Ray Data batch inference (default); process: one plain process")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    kw = dict(cohorts=args.cohorts, heatmaps=str(args.heatmaps) if args.heatmaps else None,
              heatmap_cohorts=args.heatmap_cohorts, batch_size=args.batch_size)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.launcher == "process":
        from cxr_ray.predict.output import predict_in_process

        frame, scores = predict_in_process(args.experiment, args.images, args.out, **kw)
    else:
        from cxr_ray.ray_backend import infer

        frame, scores = infer.predict(args.experiment, args.images, args.out,
                                      address=args.address, **kw)
    bad = int((frame["status"] != "ok").sum())
    print(f"predictions: {args.out} ({len(frame)} images, {bad} unreadable"
          + (f": {frame.loc[frame['status'] != 'ok', 'reason'].iloc[0]}" if bad else "") + ")")
    if args.heatmaps:
        print(f"heatmaps: {args.heatmaps}")
    if scores is not None:
        from cxr_ray.predict.output import metrics_file

        print(f"external validation ({metrics_file(args.out)}):")
        print(scores.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="where a sweep stands: each trial finished / running (epoch) / pending / failed",
        description="Read a sweep's experiment directory (no Ray needed; works while the sweep "
        "runs and after) and print, per stage, every planned trial's state: finished, running "
        "with its last finished epoch and test accuracy, pending or failed (with Tune's error), "
        "then the best policy per cohort by test accuracy so far. Example: cxr-ray status "
        "--experiment demo-run/experiments/demo",
    )
    p.add_argument("--experiment", type=location, required=True,
                   help="the sweep's experiment dir (storage_path/name of its recipe), or its "
                        "s3:// URI")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from cxr_ray.sweep import status

    result = status.experiment_status(local_experiment(args.experiment))
    result["experiment"] = str(args.experiment)  # the URI, not its local copy
    print(json.dumps(result, indent=2) if args.json else status.format_status(result))
    return 0
