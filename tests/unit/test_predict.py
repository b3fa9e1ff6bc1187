"""cxr-ray predict without Ray: model selection, every kind of input (good and bad), the
equality of its probabilities with the training run's own evaluation of the same checkpoint,
external validation, Grad-CAM heatmaps.

The experiment is a real one, trained in this process (tests/conftest.py's
``small_experiment``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_ray import paths
from cxr_ray.data import decode, nih
from cxr_ray.errors import UserError
from cxr_ray.predict import output
from cxr_ray.predict.engine import Predictor, cam_layers, load_model
from cxr_ray.predict.inputs import list_inputs, read_input
from cxr_ray.predict.select import recipe_hash, select_models

COHORTS = ["Effusion", "OneClass"]


@pytest.fixture(scope="module")
def experiment(small_experiment):
    return small_experiment


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def _dicom(path: Path, stored: np.ndarray, photometric: str, **extra) -> Path:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-12345"  # must never reach the output
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def inputs(local_shards, tmp_path_factory):
    """Test-split PNGs of both cohorts (with their labels CSV), plus one file of every
    awkward kind."""
    from cxr_ray.data import shards as shard_io

    data = local_shards.parent / "data"
    folder = tmp_path_factory.mktemp("inputs")
    meta = nih.load_metadata(data / "Data_Entry_2017.csv")
    sh = shard_io.open_shards(local_shards)
    chosen = []
    for cohort in COHORTS:
        ids = set(shard_io.cohort_table(sh, cohort, "test")["image_id"].tolist())
        chosen += sorted(n for n in meta[nih.IMAGE] if decode.image_id(n) in ids)[:12]
    chosen = sorted(set(chosen))
    for name in chosen:
        shutil.copy(data / "images" / name, folder / name)
    meta[meta[nih.IMAGE].isin(chosen)].to_csv(folder / "Data_Entry_2017.csv", index=False)
    grey = np.asarray(Image.open(data / "images" / chosen[0]))
    odd = folder / "odd"
    odd.mkdir()
    whole = (data / "images" / chosen[1]).read_bytes()
    (odd / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (odd / "notes.txt").write_text("not an image\n")
    (odd / "empty.png").write_bytes(b"")
    _png(odd / "rgba.png", np.dstack([grey, grey, grey, np.full_like(grey, 255)]), "RGBA")
    _png(odd / "sixteen.png", (grey.astype(np.uint16) * 257))  # PIL: mode I;16
    stored = (grey.astype(np.int64) * 4095 // 255).astype(np.uint16)
    _dicom(odd / "mono2.dcm", stored, "MONOCHROME2")
    _dicom(odd / "mono1.dcm", 4095 - stored, "MONOCHROME1")
    _dicom(odd / "windowed.dcm", stored, "MONOCHROME2", WindowCenter=2048, WindowWidth=4096)
    return {"dir": folder, "names": chosen, "grey": grey}


# --------------------------------------------------------------------------- selection
def test_each_cohort_uses_its_best_validation_checkpoint_and_threshold(experiment):
    chosen = select_models(experiment)
    assert sorted(chosen) == sorted(COHORTS)
    for cohort, m in chosen.items():
        assert m.stage == "stage2" and m.policy in ("constant", "triangular")
        runs = {p: paths.read_jsonl(experiment / "stage2" / f"{cohort}__{p}" /
                                    paths.HISTORY_FILE) for p in ("constant", "triangular")}
        best = max(r["val_accuracy"] for h in runs.values() for r in h)
        assert m.val_accuracy == best
        record = next(r for r in runs[m.policy] if r["epoch"] == m.epoch)
        assert m.threshold == record["val_threshold"]
        assert Path(m.checkpoint).is_file() and f"epoch_{m.epoch:04d}" in m.checkpoint
    assert len(recipe_hash(experiment)) == 12
    with pytest.raises(UserError, match="unknown cohort 'Covid'"):
        select_models(experiment, ["Covid"])
    with pytest.raises(UserError, match="cohort Mass has no finished stage-1 or stage-2"):
        select_models(experiment, ["Mass"])


# --------------------------------------------------------------------------- inputs
def test_every_input_gets_a_row_with_its_reason(inputs):
    files = list_inputs(inputs["dir"])
    assert not any(f.endswith("Data_Entry_2017.csv") for f in files)  # labels are not inputs
    assert len(files) == len(inputs["names"]) + 8
    size = 32
    read = {Path(f).name: read_input(f, size) for f in files}
    assert read["truncated.png"][2].startswith("truncated image")
    assert read["notes.txt"][2].startswith("not an image")
    assert read["empty.png"][2] == "empty file: 0 bytes"
    reference = decode.resize_gray(Image.fromarray(inputs["grey"]), False, size)
    for name in ("rgba.png", "sixteen.png", "mono2.dcm", "mono1.dcm", "windowed.dcm"):
        pixels, source, reason = read[name]
        assert reason == "" and pixels.shape == (size, size), name
        # the same picture whatever the container: within the 12-bit rounding
        assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 2, name
    assert read["mono1.dcm"][1].startswith("DICOM MONOCHROME1 12-bit")
    assert read["rgba.png"][1].startswith("image RGBA")
    for _, source, _ in read.values():
        assert "Doe" not in source and "PID" not in source


# --------------------------------------------------------------------------- predictions
def test_predictions_equal_the_runs_own_evaluation(experiment, inputs, tmp_path):
    """The test-split images, read from their PNGs, get exactly the scores the training run
    recorded for them at the chosen epoch (the same checkpoint on the same pixels)."""
    frame, scores = output.predict_in_process(experiment, inputs["dir"], tmp_path / "p.csv",
                                              batch_size=7)
    assert list(frame["image"]) == list_inputs(inputs["dir"])  # one row per input, in order
    assert (frame["status"] == "ok").sum() == len(inputs["names"]) + 5
    bad = frame[frame["status"] != "ok"]
    assert sorted(Path(p).name for p in bad["image"]) == ["empty.png", "notes.txt",
                                                           "truncated.png"]
    assert bad["Effusion"].isna().all() and bad["reason"].str.len().gt(0).all()
    chosen = select_models(experiment)
    for cohort, m in chosen.items():
        run = Path(m.checkpoint).parent.parent
        stored = np.load(paths.predictions_file(run, m.epoch))
        by_id = dict(zip(stored["test_image_id"].tolist(), stored["test_score"].tolist()))
        col = output.column(cohort)
        checked = 0
        for _, row in frame[frame["status"] == "ok"].iterrows():
            image_id = decode.image_id(Path(row["image"]).name)
            if Path(row["image"]).parent == inputs["dir"] and image_id in by_id:
                assert row[col] == pytest.approx(by_id[image_id], abs=1e-6), row["image"]
                checked += 1
        assert checked >= 5, cohort
        decision = "anomaly" if cohort == "OneClass" else f"{cohort}_positive"
        ok = frame["status"] == "ok"
        assert (frame.loc[ok, decision] == (frame.loc[ok, col] >= m.threshold).astype(int)).all()
        assert (frame[f"{'anomaly' if cohort == 'OneClass' else cohort}_threshold"]
                == m.threshold).all()
    assert (frame["recipe_hash"] == recipe_hash(experiment)).all()
    assert pd.read_csv(tmp_path / "p.csv").shape[0] == len(frame)
    # external validation: the labels CSV beside the images
    assert scores is not None and sorted(scores["cohort"]) == sorted(COHORTS)
    for _, r in scores.iterrows():
        if pd.notna(r.get("accuracy")):
            assert r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"]
            assert 0 <= r["auc"] <= 1 and r["images"] > 0
    assert output.metrics_file(tmp_path / "p.csv").is_file()


def test_heatmaps_per_image_and_cohort_from_a_7x7_or_larger_map(experiment, inputs,
                                                                  tmp_path):
    chosen = select_models(experiment)
    net = load_model(chosen["Effusion"], "cpu")
    # at 32² the stride-8 map is 4x4: the deepest block of at least 7x7 alone (8x8)
    assert [(n, s) for n, _, s in cam_layers(net, 32)] == [("backbone.features.3", (8, 8))]
    # at 224²: the last block of the stride-8, -16 and -32 stages
    assert [(n, s) for n, _, s in cam_layers(net, 224)] == [
        ("backbone.features.5", (28, 28)), ("backbone.features.11", (14, 14)),
        ("backbone.features.13", (7, 7))]
    frame, _ = output.predict_in_process(experiment, inputs["dir"], tmp_path / "p.csv",
                                         heatmaps=str(tmp_path / "maps"),
                                         heatmap_cohorts=["Effusion", "OneClass"])
    ok = frame[frame["status"] == "ok"]
    for _, row in ok.iterrows():
        a, b = Path(row["Effusion_heatmap"]), Path(row["anomaly_heatmap"])
        assert a.is_file() and b.is_file() and a != b
    assert (frame.loc[frame["status"] != "ok", "Effusion_heatmap"].fillna("") == "").all()
    predictor = Predictor(chosen)
    pixels = np.stack([read_input(p, 32)[0] for p in ok["image"][:6]])
    maps = {c: predictor.heatmaps(pixels, c) for c in chosen}
    assert all(m.shape == (6, 32, 32) and m.min() >= 0 and m.max() <= 1 for m in maps.values())
    assert not np.allclose(maps["Effusion"], maps["OneClass"])  # two models, two maps
    with pytest.raises(UserError, match="--heatmap-cohorts needs --heatmaps DIR"):
        output.setup(experiment, inputs["dir"], heatmap_cohorts=["Effusion"])
    with pytest.raises(UserError, match="--heatmap-cohorts Mass: not among"):
        output.setup(experiment, inputs["dir"], heatmaps="x", heatmap_cohorts=["Mass"])
