"""The `cxr-ray` command line: parse arguments, call the library, print results.

Every subcommand is a pair: ``_add_<name>(subparsers)`` declares its flags and
``_cmd_<name>(args)`` runs it.  Handlers stay thin; the work lives in the library.
A :class:`~cxr_ray.errors.UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cxr_ray import cli_experiment as experiment_cli
from cxr_ray import storage
from cxr_ray.errors import UserError

log = logging.getLogger("cxr_ray")


# --------------------------------------------------------------------------- cohorts
def _add_cohorts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cohorts",
        help="print the class table and the 15 cohorts (sizes, patient-wise splits)",
        description="Read NIH metadata, print the per-class table (the study's Table 1) and, for each of "
        "the 15 cohorts, positives, negatives, and the train/val/test images and patients.",
    )
    _metadata_flag(p)
    p.add_argument("--negatives", choices=["ratio", "paper"], default="ratio",
                   help="No Finding negatives per cohort: 1:1 with positives (ratio, default) "
                        "or the study's Table 2 counts (paper)")
    p.add_argument("--seed", type=int, default=0, help="seed for negative sampling and the split")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of patients in the test split (default 0.2, the study's 1:4)")
    p.add_argument("--val-fraction", type=float, default=0.125,
                   help="fraction of the training side's images held out, by patient, as the "
                        "validation split that selects checkpoints and thresholds (default "
                        "0.125: 70/10/20 train/val/test)")
    p.add_argument("--split", choices=["patient", "official"], default="patient",
                   help="patient: seeded patient-wise split (default); official: NIH split lists "
                        "(validation is still carved by patient from train_val_list.txt)")
    p.add_argument("--split-dir", type=Path, default=None,
                   help="directory holding train_val_list.txt and test_list.txt "
                        "(for --split official; default: the metadata file's directory)")
    p.add_argument("--cohort", action="append", default=None, metavar="NAME",
                   help="only this cohort (repeatable; default: all 15)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_cohorts)


def _cmd_cohorts(args: argparse.Namespace) -> int:
    from cxr_ray.data import cohorts, nih

    meta = nih.load_metadata(args.metadata)
    classes = nih.class_table(meta)
    recipe = cohorts.CohortConfig(
        negatives=args.negatives, seed=args.seed, test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        split=args.split, split_dir=args.split_dir or _default_split_dir(args.metadata),
    )
    names = tuple(cohorts.resolve_cohort(n) for n in args.cohort) if args.cohort else cohorts.COHORTS
    built = cohorts.build_all(meta, recipe, names=names)
    summary = cohorts.summarize(built)
    if args.json:
        print(json.dumps({"classes": classes, "cohorts": summary}, indent=2))
    else:
        print(nih.format_class_table(classes))
        print()
        print(cohorts.format_summary(summary))
    return 0


def _default_split_dir(metadata: Path | None) -> Path | None:
    return metadata.parent if metadata is not None else None


# --------------------------------------------------------------------------- synth
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic NIH-layout data set (real metadata rows, learnable images)",
        description="Sample real rows of the NIH metadata and draw a synthetic but learnable "
        "chest-like PNG for each: DIR/images/*.png, DIR/Data_Entry_2017.csv, split lists.",
    )
    p.add_argument("--out", type=experiment_cli.local_dir, required=True, help="output directory")
    p.add_argument("--per-class", type=int, default=40,
                   help="images sampled per finding (and for No Finding); default 40")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and drawing")
    p.add_argument("--workers", type=int, default=None,
                   help="processes drawing images (default: all cores)")
    p.add_argument("--single-finding", action="store_true",
                   help="controlled variant: only rows naming one label, no label noise, so "
                   "a finding's drawn shape alone tells its images from No Finding (for "
                   "checking where heatmaps point)")
    _metadata_flag(p)
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from cxr_ray.data import synth

    result = synth.write_dataset(
        args.out, per_class=args.per_class, size=args.size, seed=args.seed,
        metadata=args.metadata, workers=args.workers, single_finding=args.single_finding,
    )
    print(f"wrote {result.images} images ({result.megabytes:.1f} MB) to {result.out} "
          f"in {result.seconds:.1f} s ({result.images / max(result.seconds, 1e-9):.1f} images/s)")
    return 0


# --------------------------------------------------------------------------- schedule
def _add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schedule",
        help="preview an lr policy: the lr in force at every optimizer step",
        description="Print (or plot) the lr of each optimizer step 0..N-1 under a policy: "
        "constant, time_decay, triangular, triangular2, exp_range, modified_triangular2, "
        "one_cycle, warmup_cosine, sgdr. Step 0 is base_lr (sgdr: max_lr); a CLR peak is at "
        "step STEP_SIZE, the base again at 2*STEP_SIZE (sgdr restarts every 2*STEP_SIZE). "
        "warmup_cosine and one_cycle span --steps. "
        "Example: cxr-ray schedule --policy modified_triangular2 --base-lr 0.0075 "
        "--max-lr 0.03 --step-size 4 --steps 40 --json",
    )
    p.add_argument("--policy", required=True,
                   help="constant, time_decay, triangular, triangular2, exp_range, "
                        "modified_triangular2, one_cycle, warmup_cosine or sgdr")
    p.add_argument("--base-lr", type=float, required=True,
                   help="lr at step 0: the lower CLR bound, lr0 of constant/time_decay, the "
                        "start of one_cycle")
    p.add_argument("--max-lr", type=float, default=None,
                   help="upper bound (CLR policies, one_cycle, warmup_cosine, sgdr)")
    p.add_argument("--step-size", type=int, default=None,
                   help="CLR half cycle in optimizer steps (the study: 2 epochs' worth)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to preview")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="exp_range: amplitude scale gamma**step, in (0, 1] (default 1)")
    p.add_argument("--decay", type=float, default=0.0,
                   help="Keras time decay: lr / (1 + decay*step); for CLR policies it composes "
                        "on top (the study's SGD with decay + CLR); default 0")
    p.add_argument("--pct-start", type=float, default=0.3,
                   help="one_cycle: fraction of the steps spent rising (default 0.3)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="only for --plot and the summary: label the x axis in epochs")
    p.add_argument("--json", action="store_true",
                   help='print {"lr": [lr at step 0, ..., lr at step N-1]}')
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="draw the schedule to a PNG file")
    p.set_defaults(func=_cmd_schedule)


def _cmd_schedule(args: argparse.Namespace) -> int:
    from cxr_ray.optim import schedules

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        raise UserError(f"--steps-per-epoch must be >= 1, got {args.steps_per_epoch}")
    config = schedules.PolicyConfig(
        name=args.policy, base_lr=args.base_lr, max_lr=args.max_lr, step_size=args.step_size,
        gamma=args.gamma, decay=args.decay, total_steps=args.steps, pct_start=args.pct_start,
    )
    lrs = schedules.policy_lrs(config, args.steps)
    if args.plot is not None:
        path = schedules.plot_schedule(lrs, args.plot, title=schedules.describe_policy(config),
                                       steps_per_epoch=args.steps_per_epoch)
        log.info("wrote %s", path)
    if args.json:
        print(json.dumps({"lr": lrs}))
        return 0
    print(f"{schedules.describe_policy(config)}; {args.steps} steps")
    print(f"lr: first {lrs[0]:.6g}, min {min(lrs):.6g}, max {max(lrs):.6g}, last {lrs[-1]:.6g}")
    found = schedules.peaks(lrs)
    if found:
        shown = ", ".join(f"{lr:.6g} @ {step}" for step, lr in found[:12])
        more = f" (+{len(found) - 12} more)" if len(found) > 12 else ""
        print(f"peaks (lr @ step): {shown}{more}")
    return 0


# --------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="decode every listed image once into Parquet shards + the 15 cohort tables (Ray Data)",
        description="Decode every image the metadata lists (8-bit grey; RGB/RGBA/16-bit converted), "
        "resize it to SIZE² with antialiasing and write SHARDS/images/*.parquet, "
        "SHARDS/cohorts/<Cohort>.parquet, SHARDS/quarantine.csv (files that could not be used, "
        "with the reason) and SHARDS/manifest.json (written last: a set without it is "
        "incomplete). Runs on a local Ray started for the command, or on the cluster at "
        "--address / RAY_ADDRESS. Example: cxr-ray prepare --data /tmp/s --out /tmp/sh --size 64",
    )
    p.add_argument("--data", type=Path, required=True,
                   help="data directory: images anywhere below it, metadata, split lists")
    p.add_argument("--out", type=experiment_cli.location, required=True,
                   help="shard directory (SHARDS), or an object-store URI (s3://bucket/shards)")
    p.add_argument("--size", type=int, default=224,
                   help="training resolution: images become SIZE×SIZE (default 224)")
    p.add_argument("--metadata", type=Path, default=None,
                   help="NIH metadata CSV or CSV.gz (default: DATA/Data_Entry_2017.csv if present, "
                        "else the real table shipped in torchxrayvision)")
    p.add_argument("--strict", action="store_true",
                   help="exit 2 if any listed image was quarantined (the shard set is still written)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray for the command)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if SHARDS is up to date or was prepared with other settings")
    p.add_argument("--negatives", choices=["ratio", "paper"], default="ratio",
                   help="No Finding negatives per cohort: 1:1 (ratio, default) or Table 2 (paper)")
    p.add_argument("--seed", type=int, default=0, help="seed for negative sampling and the split")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of each cohort's images in the test split (default 0.2)")
    p.add_argument("--val-fraction", type=float, default=0.125,
                   help="fraction of the training side's images held out, by patient, as the "
                        "validation split that selects checkpoints and thresholds (default "
                        "0.125: 70/10/20 train/val/test)")
    p.add_argument("--split", choices=["patient", "official"], default="patient",
                   help="patient: seeded patient-wise split (default); official: NIH split lists "
                        "(validation is still carved by patient from train_val_list.txt)")
    p.add_argument("--split-dir", type=Path, default=None,
                   help="directory with train_val_list.txt and test_list.txt (default: --data)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="at most this many images per shard (default: about 64 MB of pixels)")
    p.add_argument("--throttle-s", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cxr_ray.data import cohorts
    from cxr_ray.data.prepare import PrepareConfig
    from cxr_ray.ray_backend import ingest

    recipe = cohorts.CohortConfig(
        negatives=args.negatives, seed=args.seed, test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        split=args.split, split_dir=args.split_dir or args.data,
    )
    config = PrepareConfig(
        data=args.data, out=args.out, size=args.size, metadata=args.metadata, cohort=recipe,
        address=args.address, force=args.force, shard_rows=args.shard_rows,
        throttle_s=args.throttle_s,
    )
    result = ingest.prepare(config)
    print(result.summary())
    if result.quarantined:
        if args.strict:
            raise UserError(result.quarantine_line())
        print(f"cxr-ray prepare: warning: {result.quarantine_line()}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- train / lr-find
#: TrainConfig fields the commands set themselves (not flags).
_NOT_FLAGS = ("throttle_s",)


def _train_flags(p: argparse.ArgumentParser, *, epochs_help: str | None = None) -> None:
    """One flag per :class:`~cxr_ray.train.TrainConfig` field, help from its docstring."""
    from cxr_ray.config_flags import add_dataclass_flags
    from cxr_ray.train import TrainConfig

    p.add_argument("--out", type=experiment_cli.local_dir, required=True,
                   help="run directory: checkpoints, history.jsonl, tensorboard/ (re-running "
                        "the same command on it resumes)")
    actions = add_dataclass_flags(p, TrainConfig, skip=_NOT_FLAGS,
                                  required=("shards", "cohort"))
    if epochs_help:
        actions["epochs"].help = epochs_help


def _train_config(args: argparse.Namespace):
    from cxr_ray.config_flags import dataclass_kwargs
    from cxr_ray.train import TrainConfig

    return TrainConfig(**dataclass_kwargs(args, TrainConfig, skip=_NOT_FLAGS))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one cohort's classifier (Ray Train DDP by default), checkpoint every epoch",
        description="Train a model on one cohort's train split, evaluate the whole test split "
        "every epoch (loss, accuracy, ROC AUC, sensitivity, specificity), write "
        "OUT/history.jsonl, checkpoints and OUT/tensorboard/. Stage 1 uses the study's "
        "Table 4 recipe; stage 2 adds --init-from STAGE1_RUN and a cyclical --policy. "
        "Re-running the same command resumes. --launcher process trains in this process "
        "without Ray. Example: cxr-ray train --shards /tmp/sh --cohort Pneumothorax "
        "--out runs/ptx --epochs 3",
    )
    _train_flags(p)
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from cxr_ray.train import fit_in_process
    from cxr_ray.train.runlog import format_epoch

    config = _train_config(args).validate()
    out = args.out.expanduser().resolve()
    if config.launcher == "process":
        summary = fit_in_process(config, storage_path=out.parent, name=out.name)
    else:
        from cxr_ray.ray_backend import train_launcher

        summary = train_launcher.fit(config, storage_path=out.parent, name=out.name)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    print(format_epoch(summary.history[-1], summary.epochs))
    print(f"run {summary.run_dir}: {summary.epochs} epochs ({summary.resumed_from_epoch} "
          f"before this call), {summary.wall_seconds:.0f} s; best {summary.checkpoint_metric} "
          f"{summary.best_metric} at {summary.best_checkpoint}")
    print(f"tensorboard: tensorboard --logdir {summary.run_dir}")
    return 0


def _add_lr_find(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lr-find",
        help="LR range test: loss vs an exponential lr ramp, suggested CLR bounds",
        description="Train while the lr grows exponentially every step from --start-lr to "
        "--end-lr (losses averaged across workers), stop when the loss diverges, and write "
        "OUT/lr_find.json (the curve and the suggested base_lr/max_lr, which "
        "cxr-ray train --lr-bounds reads), OUT/lr_find.png and OUT/tensorboard/. Example: "
        "cxr-ray lr-find --shards /tmp/sh --cohort Pneumothorax --out runs/ptx-lr "
        "--init-from runs/ptx",
    )
    _train_flags(p, epochs_help="length of the ramp in epochs when --steps is not given "
                                "(default 1, and at least 50 steps)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="lr of the first step (1e-7)")
    p.add_argument("--end-lr", type=float, default=1.0, help="lr of the last step (1)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the ramp (default: --epochs epochs' worth, at least 50)")
    p.add_argument("--rule", default="paper", choices=["paper", "steepest", "valley"],
                   help="suggestion rule: paper (min loss; base = max/4), steepest, valley")
    p.add_argument("--repeats", type=int, default=1,
                   help="ramps from the same start, each with its own batch order; the bounds "
                   "are the median, with their spread (default 1)")
    p.add_argument("--loss", default="train", choices=["train", "val"],
                   help="train: each step's training batch; val: fixed validation batches "
                   "after each step (default train)")
    p.add_argument("--window", type=float, default=0.04,
                   help="smoothing window as a fraction of the ramp (default 0.04)")
    p.add_argument("--fallback", default="measured",
                   choices=["measured", "stage1", "paper", "error"],
                   help="bounds when the curve is flat, has no turn or the repeats disagree: "
                   "measured (keep them, flagged; default), stage1 (the --init-from run's lr "
                   "x [1/4, 1]), paper (the study's Table 8 where the model and resolution are "
                   "the study's) or error")
    p.set_defaults(func=_cmd_lr_find)


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from cxr_ray.train import LrFindSpec, lr_find_in_process, plan_run

    config = _train_config(args).validate()
    steps = args.steps
    if steps is None:
        plan = plan_run(config)
        steps = max(50, config.epochs * plan.steps_per_epoch if "epochs" in vars(args)
                    else plan.steps_per_epoch)
    trained_lr = None
    if config.init_from:  # the stage1 fallback: the lr the start model was trained with
        from cxr_ray import paths

        summary = paths.read_json(Path(config.init_from) / paths.SUMMARY_FILE) or {}
        trained_lr = ((summary.get("plan") or {}).get("policy") or {}).get("base_lr")
    spec = LrFindSpec(out=str(args.out.expanduser().resolve()), settings={
        "min_lr": args.start_lr, "max_lr": args.end_lr, "num_steps": steps, "rule": args.rule,
        "repeats": args.repeats, "loss": args.loss, "window": args.window,
        "fallback": args.fallback}, trained_lr=trained_lr)
    if config.launcher == "process":
        result = lr_find_in_process(config, spec)
    else:
        from cxr_ray.ray_backend import train_launcher

        result = train_launcher.lr_find(config, spec)
    print(json.dumps({k: result[k] for k in ("base_lr", "max_lr", "rule", "suggestions",
                                             "spread", "problems", "warnings", "bounds_source",
                                             "stop_reason")}, indent=2))
    print(f"curve: {args.out / 'lr_find.png'}; bounds for cxr-ray train: "
          f"--lr-bounds {args.out / 'lr_find.json'}")
    return 0


# --------------------------------------------------------------------------- sweep
def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run the two-stage cohort x policy comparison with Ray Tune, then the report",
        description="Stage 1 per cohort -> LR range test -> stage 2 (cohort x policy from the "
        "stage-1 checkpoints) -> report. Re-running the same command resumes: finished trials "
        "are not re-run.",
    )
    p.add_argument("--config", type=Path, required=True, help="recipe TOML (e.g. jobs/demo.toml)")
    p.add_argument("--resume", action="store_true",
                   help="require an existing experiment to continue (re-running resumes anyway)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key, value in TOML syntax "
                        "(e.g. --set stage2.epochs=2 --set experiment.name='\"try2\"')")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_sweep)


def _parse_overrides(items: list[str]) -> dict:
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set {item!r}: use SECTION.KEY=VALUE, e.g. --set stage2.epochs=2")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare string
    return out


def _cmd_sweep(args: argparse.Namespace) -> int:
    from cxr_ray.ray_backend import tune
    from cxr_ray.sweep.recipe import load_recipe

    recipe = load_recipe(args.config, _parse_overrides(args.set))
    path = tune.run_sweep(recipe, resume=args.resume, address=args.address)
    print(f"report: {path}")
    if storage.is_uri(recipe.experiment_uri):
        print(f"tensorboard: tensorboard --logdir {recipe.experiment_uri.partition('?')[0]} "
              "(TensorBoard reads s3:// through boto3: pip install 'cxr-ray[s3]')")
    else:
        print(f"tensorboard: tensorboard --logdir {recipe.experiment_dir}")
    return 0


# --------------------------------------------------------------------------- helpers
def _metadata_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metadata", type=Path, default=None,
                   help="NIH metadata CSV or CSV.gz (default: the real Data_Entry_2017_v2020 "
                        "table shipped in torchxrayvision)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-ray",
        description="Ray-distributed training of NIH ChestX-ray14 classifiers and the "
        "cyclical-learning-rate study.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_cohorts, _add_synth, _add_schedule, _add_prepare, _add_train,
                _add_lr_find, _add_sweep, experiment_cli.add_report,
                experiment_cli.add_predict, experiment_cli.add_status):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"cxr-ray {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cxr-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
