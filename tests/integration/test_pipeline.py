"""cxr_ray.data.decode + cxr-ray prepare (data/prepare, ray_backend/ingest) (decode once → shards) and the training stream.

Fast tests (no Ray) cover decoding, conversion and the batch transforms; ``slow`` ones
share the session's local Ray (``ray_local``) and a few dozen 64² synthetic images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cxr_ray.data import shards as pipeline
from cxr_ray.data.prepare import PrepareConfig
from cxr_ray.ray_backend import ingest
from cxr_ray.train.feed import ArrayFeed
from cxr_ray.data import augment, cohorts, decode, nih
from cxr_ray.errors import UserError

SIZE = 32  # prepared resolution in these tests (the synthetic images are 64²)
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers
def pil_expected(path: Path, size: int = SIZE) -> np.ndarray:
    """A direct PIL decode + antialiased resize, written independently of cxr_ray.data.decode."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I;16"):
            scaled = np.asarray(im).astype(np.float32) * (255.0 / 65535.0)
            out = Image.fromarray(scaled, "F").resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.clip(np.rint(np.asarray(out)), 0, 255).astype(np.uint8)
        gray = im if im.mode == "L" else im.convert("L")
        return np.asarray(gray.resize((size, size), Image.BILINEAR, reducing_gap=None))


def assert_close(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert got.shape == want.shape and diff.max() <= 1, f"{what}: max grey difference {diff.max()}"


def read_images(out: Path) -> pd.DataFrame:
    table = pa.concat_tables([pq.read_table(f) for f in sorted((out / "images").glob("*.parquet"))])
    frame = table.drop_columns(["pixels"]).to_pandas()
    frame["pixels"] = list(decode.pixels_to_numpy(table.column("pixels"), SIZE))
    return frame.sort_values("image_index").reset_index(drop=True)


def cli(*args: str, address: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "cxr_ray.cli", *args]
    if address:
        cmd += ["--address", address]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
                          **kwargs)


def png_names(data: Path) -> list[str]:
    return pd.read_csv(data / "Data_Entry_2017.csv")["Image Index"].tolist()


# --------------------------------------------------------------------------- ids
def test_image_id_nih_pattern_and_fallback():
    assert decode.image_id("00000001_000.png") == 1000
    assert decode.image_id("00030805_183.png") == 30805183
    other = [decode.image_id(n) for n in ("scan.png", "a/b.png", "00000001_000.jpg")]
    assert all(2**62 <= i < 2**63 for i in other)
    assert len(set(other)) == 3 and decode.image_id("scan.png") == other[0]  # stable


# --------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, tiny_synth):
    """One file per case the decoder must handle: converted ones and broken ones."""
    d = tmp_path_factory.mktemp("odd")
    src = sorted((tiny_synth / "images").glob("*.png"))[0]
    base = np.asarray(Image.open(src))
    data = src.read_bytes()
    rng = np.random.default_rng(0)
    files = {"gray": src}
    rgb = np.stack([base, (base * 0.5).astype(np.uint8), 255 - base], -1)
    Image.fromarray(rgb, "RGB").save(files.setdefault("rgb", d / "rgb.png"))
    alpha = rng.integers(0, 256, base.shape, dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(files.setdefault("rgba", d / "rgba.png"))
    sixteen = base.astype(np.uint16) * 257 + rng.integers(0, 257, base.shape).astype(np.uint16)
    Image.fromarray(sixteen).save(files.setdefault("sixteen", d / "sixteen.png"))
    Image.fromarray(base).resize((512, 512), Image.BILINEAR).save(files.setdefault("big", d / "big.png"))
    Image.fromarray(base).resize((96, 64)).save(files.setdefault("wide", d / "wide.png"))
    files["truncated"] = d / "truncated.png"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["header_cut"] = d / "header_cut.png"
    files["header_cut"].write_bytes(data[:20])
    files["empty"] = d / "empty.png"
    files["empty"].write_bytes(b"")
    files["text"] = d / "text.png"
    files["text"].write_text("this is not a PNG\n")
    files["missing"] = d / "missing.png"
    files["folder"] = d / "folder.png"
    files["folder"].mkdir()
    return files


EXPECTED_REASON = {"truncated": "truncated image", "header_cut": "truncated image",
                   "empty": "empty file", "text": "not an image", "missing": "missing file",
                   "folder": "unreadable file"}


def test_decode_batch_converts_or_quarantines_every_file(odd_files):
    names = list(odd_files)
    batch = pa.table({"image_index": names, "path": [str(odd_files[n]) for n in names]})
    out = decode.decode_batch(batch, size=SIZE)
    assert out.num_rows == len(names) and "path" not in out.column_names
    rows = out.drop_columns(["pixels"]).to_pylist()
    for name, row in zip(names, rows):
        if name in EXPECTED_REASON:
            assert row["status"] == "quarantined", name
            assert decode.reason_kind(row["reason"]) == EXPECTED_REASON[name], row["reason"]
        else:
            assert row["status"] == "ok" and row["reason"] is None, (name, row["reason"])
    assert out.column("pixels").null_count == len(EXPECTED_REASON)
    modes = {n: r["source_mode"] for n, r in zip(names, rows)}
    assert modes["rgb"] == "RGB" and modes["rgba"] == "RGBA" and modes["sixteen"] == "I;16"
    assert (rows[names.index("big")]["source_width"], rows[names.index("wide")]["source_width"]) == (512, 96)

    good = [n for n in names if n not in EXPECTED_REASON]
    ok = out.filter(pa.compute.equal(out.column("status"), "ok"))
    pixels = decode.pixels_to_numpy(ok.column("pixels"), SIZE)
    for name, got in zip(good, pixels):
        assert_close(got, pil_expected(odd_files[name]), name)


def test_sixteen_bit_is_scaled_not_clipped(odd_files):
    got = decode.decode_image(str(odd_files["sixteen"]), SIZE).pixels
    clipped = np.asarray(Image.open(odd_files["sixteen"]).convert("L"))  # PIL's own: clips at 255
    assert clipped.mean() > 250 and 20 < got.mean() < 235
    eight_first = np.rint(np.asarray(Image.open(odd_files["sixteen"])) / 257.0).astype(np.uint8)
    want = np.asarray(Image.fromarray(eight_first).resize((SIZE, SIZE), Image.BILINEAR,
                                                         reducing_gap=None))
    assert_close(got, want, "16-bit vs 8-bit-first")


def test_rgba_drops_alpha(odd_files):
    got = decode.decode_image(str(odd_files["rgba"]), SIZE).pixels
    rgb = decode.decode_image(str(odd_files["rgb"]), SIZE).pixels
    np.testing.assert_array_equal(got, rgb)  # the random alpha changed nothing


def test_decode_never_raises_on_odd_paths(tmp_path):
    batch = pa.table({"path": [None, "", str(tmp_path), str(tmp_path / "nope.png")]})
    out = decode.decode_batch(batch, size=8)
    assert out.column("status").to_pylist() == ["quarantined"] * 4


def test_pixels_column_round_trips_through_parquet(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(256), 5, [None, pa.py_buffer(images)])
    pq.write_table(pa.table({"pixels": col}), tmp_path / "p.parquet", compression="zstd")
    back = pq.read_table(tmp_path / "p.parquet").column("pixels")
    np.testing.assert_array_equal(decode.pixels_to_numpy(back, 16), images)
    np.testing.assert_array_equal(decode.pixels_to_numpy(back.slice(2, 2), 16), images[2:4])


# --------------------------------------------------------------------------- transforms
def _stream_like_batch(n: int = 6, size: int = 16) -> dict[str, torch.Tensor]:
    img = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (size, size), dtype=np.uint8))
    return {"image": img.expand(n, size, size).clone(),  # the same picture n times
            "image_id": torch.arange(n, dtype=torch.int64) * 1000 + 7,
            "label": torch.tensor([0, 1] * (n // 2), dtype=torch.float32)}


def test_model_batch_train_is_per_image_deterministic_and_epoch_dependent():
    batch = _stream_like_batch()
    x0, y = pipeline.train_transform(batch, epoch=0, seed=5)
    assert x0.shape == (6, 1, 16, 16) and x0.dtype == torch.float32 and y.dtype == torch.float32
    assert 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0
    # Same picture, different ids → different transforms: not one shared transform per batch.
    assert len({tuple(v.flatten().tolist()) for v in x0}) == 6
    again, _ = pipeline.train_transform(batch, epoch=0, seed=5)
    torch.testing.assert_close(again, x0, rtol=0, atol=0)
    # Position in the batch does not matter: parameters follow the image id.
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = {k: v[perm] for k, v in batch.items()}
    xp, _ = pipeline.train_transform(shuffled, epoch=0, seed=5)
    torch.testing.assert_close(xp, x0[perm], rtol=0, atol=1e-6)
    x1, _ = pipeline.train_transform(batch, epoch=1, seed=5)
    assert not torch.allclose(x1, x0)
    xs, _ = pipeline.train_transform(batch, epoch=0, seed=6)
    assert not torch.allclose(xs, x0)


def test_model_batch_parameters_within_keras_ranges():
    cfg = augment.AugmentConfig()
    ids = np.arange(4000, dtype=np.int64) * 1000
    p = augment.params_for_ids(ids, seed=0, epoch=3, cfg=cfg)
    assert p.angle_deg.abs().max() <= 7 and p.shear_deg.abs().max() <= 0.05
    for z in (p.zoom_x, p.zoom_y):
        assert 0.9 <= float(z.min()) and float(z.max()) <= 1.1
    for s in (p.shift_x, p.shift_y):
        assert s.abs().max() <= 0.1
    assert 0.4 <= float(p.brightness.min()) and float(p.brightness.max()) <= 1.5
    assert 0.45 < float(p.flip.double().mean()) < 0.55
    assert p.angle_deg.unique().numel() == len(ids)  # every image draws its own


def test_model_batch_test_split_untouched():
    batch = _stream_like_batch()
    for epoch in (0, 7):
        x, y = pipeline.model_batch(batch, "test", epoch=epoch, seed=epoch)
        torch.testing.assert_close(x, augment.to_model_input(batch["image"]), rtol=0, atol=0)
        torch.testing.assert_close(y, batch["label"])
    ex, _ = pipeline.eval_transform(batch)
    torch.testing.assert_close(ex, augment.to_model_input(batch["image"]), rtol=0, atol=0)


# --------------------------------------------------------------------------- shards checks
def test_open_shards_explains_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="no shard set"):
        pipeline.open_shards(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a complete shard set"):
        pipeline.open_shards(tmp_path / "half")


def test_prepare_refuses_bad_arguments(tmp_path, tiny_synth):
    with pytest.raises(UserError, match="--size"):
        PrepareConfig(data=tiny_synth, out=tmp_path / "o", size=2)
    with pytest.raises(UserError, match="no such directory"):
        ingest.prepare(PrepareConfig(data=tmp_path / "none", out=tmp_path / "o"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a cxr-ray shard set"):
        ingest.prepare(PrepareConfig(data=tiny_synth, out=busy, size=SIZE))


# =========================================================================== with Ray
@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_synth, ray_local):
    """A clean prepare of the tiny synthetic set at SIZE² (library call, session Ray)."""
    out = tmp_path_factory.mktemp("shards") / "clean"
    result = ingest.prepare(PrepareConfig(data=tiny_synth, out=out, size=SIZE))
    assert not result.skipped
    return out


@pytest.mark.slow
def test_prepare_manifest_and_cohort_tables(prepared, tiny_synth):
    m = json.loads((prepared / "manifest.json").read_text())
    meta = nih.load_metadata(tiny_synth / "Data_Entry_2017.csv")
    assert m["rows"] == len(meta) == m["written"] and m["quarantined"] == 0
    assert m["written"] + m["quarantined"] == m["rows"] and m["size"] == SIZE
    assert m["unlisted_on_disk"] == 0 and sum(s["rows"] for s in m["shards"]) == m["written"]
    assert (prepared / "quarantine.csv").read_text().strip() == "image_index,reason"
    images = read_images(prepared)
    assert images["image_index"].tolist() == sorted(meta[nih.IMAGE])  # each image once
    # Labels and patients come through; pixels equal a direct PIL decode + resize.
    by_name = meta.set_index(nih.IMAGE)
    for row in images.to_dict("records"):
        name = row["image_index"]
        assert row["patient_id"] == by_name.at[name, nih.PATIENT]
        assert [row[lab] for lab in nih.LABELS] == [bool(by_name.at[name, lab]) for lab in nih.LABELS]
        assert_close(row["pixels"], pil_expected(tiny_synth / "images" / name), name)
    # Every cohort table matches cohorts.build_all on the same metadata.
    built = cohorts.build_all(meta, cohorts.CohortConfig(split_dir=tiny_synth))
    assert sorted(m["cohorts"]) == sorted(cohorts.COHORTS)
    for name, frame in built.items():
        table = pipeline.cohort_table(prepared, name)
        assert table["image_index"].tolist() == frame["image_index"].tolist()
        assert table["split"].tolist() == frame["split"].tolist()
        assert table["label"].tolist() == frame["label"].tolist()
        assert table["image_id"].tolist() == [decode.image_id(n) for n in frame["image_index"]]
        c = m["cohorts"][name]
        assert (c["train"] + c["val"] + c["test"], c["positives"]) == (
            len(frame), int(frame["label"].sum()))


@pytest.mark.slow
def test_every_image_once_per_epoch_with_labels_and_pixels(prepared, tiny_synth):
    table = pipeline.cohort_table(prepared, "OneClass", "train")
    labels = dict(zip(table["image_id"], table["label"].astype(np.float32)))
    names = dict(zip(table["image_id"], table["image_index"]))
    arrays = pipeline.read_split(pipeline.open_shards(prepared), "OneClass", "train")
    feed = ArrayFeed(arrays, seed=3, shuffle=True)
    orders = []
    for epoch in range(2):
        seen = []
        for batch in feed.batches(8, epoch):
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (SIZE, SIZE)
            x, y = pipeline.train_transform(batch, epoch=epoch, seed=0)
            assert x.shape == (len(y), 1, SIZE, SIZE)
            for img, iid, lab in zip(batch["image"], batch["image_id"].tolist(), y.tolist()):
                assert lab == labels[iid]
                if epoch == 0:
                    assert_close(img.numpy(), pil_expected(tiny_synth / "images" / names[iid]))
            seen += batch["image_id"].tolist()
        assert sorted(seen) == sorted(labels) and len(seen) == len(set(seen))
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch (len > 30: a tie is ~impossible)

    test = pipeline.cohort_table(prepared, "Mass", "test")
    images, ids, labs = pipeline.read_split(pipeline.open_shards(prepared), "Mass", "test")
    assert sorted(ids) == sorted(test["image_id"])
    assert dict(zip(ids.tolist(), labs.tolist())) == dict(zip(test["image_id"], test["label"]))


@pytest.mark.slow
def test_rerun_skips_refuses_other_settings_and_checks_size(prepared, tiny_synth):
    before = (prepared / "manifest.json").read_text()
    again = ingest.prepare(PrepareConfig(data=tiny_synth, out=prepared, size=SIZE))
    assert again.skipped and (prepared / "manifest.json").read_text() == before
    with pytest.raises(UserError, match=r"other settings \(size 32 → 16"):
        ingest.prepare(PrepareConfig(data=tiny_synth, out=prepared, size=16))
    with pytest.raises(UserError, match="prepared for 32, asked for 64: re-run cxr-ray prepare --size 64"):
        pipeline.open_shards(prepared, expect_size=64)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, tiny_synth):
    """The tiny set with bad and odd files in place of some listed images, plus an unlisted one."""
    data = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(tiny_synth, data)
    img = data / "images"
    names = iter(png_names(data))
    cases = {}

    def take(case: str) -> Path:
        cases[case] = next(names)
        return img / cases[case]

    p = take("truncated")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    take("empty").write_bytes(b"")
    take("text").write_text("not an image at all\n")
    take("missing").unlink()
    for case, mode in (("rgba", "RGBA"), ("rgb", "RGB")):
        p = take(case)
        base = np.asarray(Image.open(p))
        chans = [base, (base * 0.6).astype(np.uint8), 255 - base] + ([base // 2] if mode == "RGBA" else [])
        Image.fromarray(np.dstack(chans), mode).save(p)
    p = take("sixteen")
    Image.fromarray(np.asarray(Image.open(p)).astype(np.uint16) * 257 + 100).save(p)
    p = take("big")
    Image.open(p).resize((512, 512), Image.BILINEAR).save(p)
    shutil.copy(img / next(names), img / "99999999_000.png")  # on disk, not listed
    (img / "notes.txt").write_text("ignored, not an image")
    return data, cases


@pytest.mark.slow
def test_bad_files_quarantined_or_converted_and_strict_fails(bad_data, tmp_path, ray_local):
    data, cases = bad_data
    out = tmp_path / "shards"
    strict = cli("prepare", "--data", str(data), "--out", str(out), "--size", str(SIZE), "--strict",
                 address=ray_local)
    errors = [ln for ln in strict.stderr.splitlines() if ln.startswith("cxr-ray prepare: error:")]
    assert strict.returncode == 2, strict.stderr[-3000:]
    assert len(errors) == 1 and "4 of" in errors[0] and str(out / "quarantine.csv") in errors[0]
    assert "Traceback" not in strict.stderr

    m = json.loads((out / "manifest.json").read_text())
    assert (m["written"], m["quarantined"]) == (m["rows"] - 4, 4)
    assert m["written"] + m["quarantined"] == m["rows"]
    assert m["unlisted_on_disk"] == 1
    assert m["quarantine_reasons"] == {"missing file": 1, "empty file": 1, "not an image": 1,
                                       "truncated image": 1}
    assert m["converted"] == {"I;16": 1, "RGB": 1, "RGBA": 1}
    assert m["source_sizes"]["512x512"] == 1
    q = pd.read_csv(out / "quarantine.csv")
    assert list(q.columns) == ["image_index", "reason"]
    got = {n: decode.reason_kind(r) for n, r in zip(q["image_index"], q["reason"])}
    assert got == {cases["truncated"]: "truncated image", cases["empty"]: "empty file",
                   cases["text"]: "not an image", cases["missing"]: "missing file"}
    images = read_images(out).set_index("image_index")
    assert not set(got) & set(images.index)
    for case in ("rgba", "rgb", "sixteen", "big"):
        assert_close(images.at[cases[case], "pixels"], pil_expected(data / "images" / cases[case]), case)
    for name in cohorts.COHORTS:  # quarantined images are in no cohort table
        table = pipeline.cohort_table(out, name)
        assert not set(table["image_index"]) & set(got)
        assert sum(m["cohorts"][name][s] for s in cohorts.SPLITS) == len(table)

    lenient = cli("prepare", "--data", str(data), "--out", str(out), "--size", str(SIZE),
                  address=ray_local)
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    assert "up to date" in lenient.stdout
    warnings = [ln for ln in lenient.stderr.splitlines() if ln.startswith("cxr-ray prepare: warning:")]
    assert len(warnings) == 1 and "4 of" in warnings[0]

    # Fixing a file changes the inputs: the next run rebuilds instead of skipping.
    fixed = tmp_path / "fixed.png"
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(fixed)
    os.replace(fixed, data / "images" / cases["empty"])
    result = ingest.prepare(PrepareConfig(data=data, out=out, size=SIZE))
    assert not result.skipped and result.quarantined == 3


@pytest.mark.slow
def test_cli_acceptance_local_ray(tiny_synth, tmp_path):
    """What a fresh clone runs: prepare on a synth set with a local Ray started for it."""
    out = tmp_path / "sh"
    run = cli("prepare", "--data", str(tiny_synth), "--out", str(out), "--size", "64")
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["written"] + m["quarantined"] == m["rows"] == len(png_names(tiny_synth))
    assert all((out / "cohorts" / f"{c}.parquet").is_file() for c in cohorts.COHORTS)
    assert "written" in run.stdout


def _start_killable(out: Path, data: Path, address: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cxr_ray.cli", "prepare", "--data", str(data), "--out", str(out),
         "--size", str(SIZE), "--address", address, "--shard-rows", "4", "--throttle-s", "1",
         *extra],
        env=env, cwd=REPO, stdout=log, stderr=log, start_new_session=True)


def _kill_once_writing(proc: subprocess.Popen, out: Path, timeout: float = 180.0) -> None:
    """Poll (bounded) until the run has written its first shard into staging, then kill -9."""
    deadline = time.monotonic() + timeout
    while not list(out.glob(".staging-*/parts/status=ok/*.parquet")):
        assert proc.poll() is None, "prepare ended before it could be killed"
        assert time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group we started
    proc.wait(timeout=30)
    # Ray ends the dead driver's tasks on its own; wait (bounded) until their CPUs are back,
    # so none of them is still writing into the staging directory the next run removes.
    import ray

    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline + 60, "the killed run's tasks never ended"
        time.sleep(0.05)


def _content(out: Path) -> tuple:
    m = json.loads((out / "manifest.json").read_text())
    keep = ("rows", "written", "quarantined", "quarantine_reasons", "unlisted_on_disk", "size",
            "cohorts", "settings", "inputs_fingerprint", "converted")
    images = read_images(out)
    tables = {c: pipeline.cohort_table(out, c).to_dict("list") for c in cohorts.COHORTS}
    return ({k: m[k] for k in keep}, images.drop(columns=["pixels"]).to_dict("list"),
            np.stack(images["pixels"]).tobytes(), tables, (out / "quarantine.csv").read_text())


@pytest.mark.slow
def test_killed_prepare_never_looks_complete_and_rerun_finishes(prepared, tiny_synth, tmp_path,
                                                                ray_local):
    out = tmp_path / "shards"
    proc = _start_killable(out, tiny_synth, ray_local)
    _kill_once_writing(proc, out)
    assert not (out / "manifest.json").exists()
    assert list(out.glob(".staging-*"))  # killed mid-way, leftovers on disk
    with pytest.raises(UserError, match="not a complete shard set"):
        pipeline.open_shards(out)

    result = ingest.prepare(PrepareConfig(data=tiny_synth, out=out, size=SIZE))
    assert not result.skipped and not list(out.glob(".staging-*"))
    assert _content(out) == _content(prepared)  # equal to a clean run

    # A killed --force rebuild leaves the previous complete set as it was.
    before = (out / "manifest.json").read_text()
    proc = _start_killable(out, tiny_synth, ray_local, "--force")
    _kill_once_writing(proc, out)
    assert (out / "manifest.json").read_text() == before
    assert _content(out) == _content(prepared)
    again = ingest.prepare(PrepareConfig(data=tiny_synth, out=out, size=SIZE))
    assert again.skipped and not list(out.glob(".staging-*"))
