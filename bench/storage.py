"""Benchmark: what keeping an experiment in an object store costs a trial. (Not a test.)

The same trials (stage 1 and stage 2 of two cohorts, in-process launcher, tiny models) run
through :func:`cxr_ray.sweep.trial.run_trial` twice in this process: once into a local
directory, once into ``s3://`` on an S3-compatible server (moto) started on 127.0.0.1, each
reading its own shard set (local / ``s3://``). Reported: wall time of each and their ratio,
and what the object-store run sent: PUT requests and bytes per trained epoch (the commits
after every epoch's checkpoint, the final commit, the LR range test's folder).

A local server has no network latency, so the ratio is a floor; the requests and bytes per
epoch are what a real store would be sent.

Run: .venv/bin/python bench/storage.py
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _moto(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                             "127.0.0.1", "-p", str(port)], stdout=open(root / "moto.log", "w"),
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4, help="stage-1 and stage-2 epochs")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    proc, endpoint = _moto(root)
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          CXR_RAY_CACHE=str(root / "cache"))
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True
                          ).create_dir("bench")
        return _run(root, args)
    finally:
        proc.terminate()
        proc.wait()


def _run(root: Path, args: argparse.Namespace) -> int:
    from cxr_ray import storage
    from cxr_ray.data import synth
    from cxr_ray.data.prepare import PrepareConfig, decode_in_process, prepare
    from cxr_ray.sweep import plan as sweep_plan
    from cxr_ray.sweep.recipe import parse_recipe
    from cxr_ray.sweep.trial import run_trial
    from cxr_ray.train.run import fit_in_process

    synth.write_dataset(root / "data", per_class=40, size=64, seed=0, workers=2)
    shards = {"local": str(root / "shards"), "s3": "s3://bench/shards"}
    for out in shards.values():
        prepare(PrepareConfig(data=root / "data", out=out, size=32),
                decode_and_write=decode_in_process)

    sent = {"puts": 0, "bytes": 0, "push_s": 0.0, "pull_s": 0.0}
    upload, write = storage.Location.upload, storage.Location.write_bytes
    push, pull = storage.Mirror.push, storage.Mirror.pull

    def timed_push(self):
        t = time.perf_counter()
        try:
            return push(self)
        finally:
            sent["push_s"] += time.perf_counter() - t

    def timed_pull(self, only=None):
        t = time.perf_counter()
        try:
            return pull(self, only)
        finally:
            sent["pull_s"] += time.perf_counter() - t

    def counted_upload(self, local):
        sent["puts"] += 1
        sent["bytes"] += Path(local).stat().st_size
        upload(self, local)

    def counted_write(self, data):
        sent["puts"] += 1
        sent["bytes"] += len(data)
        write(self, data)

    def fit(config, *, storage_path, name, lr_find, **hooks):
        return fit_in_process(config, storage_path=storage_path, name=name, lr_find=lr_find,
                              threads=1, **hooks)

    seconds, epochs = {}, 0
    for kind, storage_path in (("local", str(root / "experiments")),
                               ("s3", "s3://bench/experiments")):
        recipe = parse_recipe({
            "experiment": {"name": "bench", "storage_path": storage_path,
                           "shards": shards[kind], "cohorts": ["Effusion", "Cardiomegaly"]},
            "train": {"model": "mobilenet_v1", "width": 0.25, "pretrained": False,
                      "batch_size": 16, "threads": 1, "keep_checkpoints": 1,
                      "checkpoint_metric": "val_accuracy", "launcher": "process"},
            "stage1": {"epochs": args.epochs}, "lr_find": {"num_steps": 20},
            "stage2": {"epochs": args.epochs, "step_size_epochs": 1},
            "grid": {"policy": ["constant", "triangular"]}})
        exp = recipe.experiment_uri
        stage1, stage2, _ = sweep_plan.plan_trials(recipe)
        if kind == "s3":
            storage.Location.upload, storage.Location.write_bytes = counted_upload, counted_write
            storage.Mirror.push, storage.Mirror.pull = timed_push, timed_pull
        try:
            t0 = time.perf_counter()
            for spec in stage1 + stage2:
                run_trial(spec, exp, fit, launcher="process")
            seconds[kind] = time.perf_counter() - t0
        finally:
            storage.Location.upload, storage.Location.write_bytes = upload, write
            storage.Mirror.push, storage.Mirror.pull = push, pull
        epochs = args.epochs * (len(stage1) + len(stage2))

    ratio = seconds["s3"] / seconds["local"]
    body = (f"`bench/storage.py` on {platform.machine()}, {os.cpu_count()} CPUs "
            f"({time.strftime('%Y-%m-%d')}): 2 cohorts × (stage 1 with its LR range test + "
            f"2 stage-2 policies), {args.epochs} epochs each ({epochs} epochs in all), "
            "MobileNetV1 width 0.25 at 32², in-process trials run one after another.\n\n"
            "| experiment and shards | seconds |\n|---|---|\n"
            f"| local directory | {seconds['local']:.1f} |\n"
            f"| `s3://` (moto on 127.0.0.1) | {seconds['s3']:.1f} |\n\n"
            f"Object store / local: **{ratio:.2f}×**. The `s3://` run sent {sent['puts']} PUT "
            f"requests, {sent['bytes'] / 2**20:.1f} MB: {sent['puts'] / epochs:.1f} requests "
            f"and {sent['bytes'] / epochs / 2**20:.2f} MB per trained epoch (the checkpoint, "
            "the changed logs and TensorBoard files, the commit). Time in the object-store run's "
            f"commits: {sent['push_s']:.1f} s ({sent['push_s'] / epochs:.2f} s per epoch), in "
            f"its pulls {sent['pull_s']:.1f} s; everything else (reading the shards over S3 "
            "included) differed by "
            f"{seconds['s3'] - seconds['local'] - sent['push_s'] - sent['pull_s']:+.1f} s. "
            "A local server has no network latency: "
            "the ratio is a floor, the requests and bytes are what a real store would "
            "receive; trials of minutes per epoch make the same per-epoch cost negligible.")
    print(body)
    if not args.no_results:
        from _results import write_section

        write_section("## Object storage", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
