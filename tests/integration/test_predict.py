"""cxr-ray predict on Ray Data (the CLI, a local Ray): the same rows as the in-process path,
bad files reported, heatmaps written by the actors, external validation printed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_ray import cli
from cxr_ray.data import nih
from cxr_ray.predict.output import metrics_file, predict_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(local_shards, tmp_path_factory):
    """20 images of the data set with their labels, a cut-short PNG and a text file."""
    data = local_shards.parent / "data"
    folder = tmp_path_factory.mktemp("predict_inputs")
    meta = nih.load_metadata(data / "Data_Entry_2017.csv")
    names = sorted(meta[nih.IMAGE])[:20]
    for n in names:
        shutil.copy(data / "images" / n, folder / n)
    meta[meta[nih.IMAGE].isin(names)].to_csv(folder / "Data_Entry_2017.csv", index=False)
    whole = (folder / names[0]).read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 3])
    (folder / "readme.txt").write_text("hello\n")
    return folder


def test_ray_data_predict_equals_the_in_process_path(small_experiment, images, tmp_path,
                                                     ray_local, capsys):
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", "--experiment", str(small_experiment), "--images", str(images),
                     "--out", str(out), "--heatmaps", str(tmp_path / "maps"),
                     "--heatmap-cohorts", "Effusion", "--batch-size", "8",
                     "--address", ray_local]) == 0
    printed = capsys.readouterr().out
    assert "22 images, 2 unreadable" in printed and "external validation" in printed
    ray_rows = pd.read_csv(out)
    local, _ = predict_in_process(small_experiment, images, tmp_path / "local.csv")
    assert list(ray_rows["image"]) == list(local["image"])  # every input, in input order
    assert list(ray_rows["status"]) == list(local["status"])
    for col in ("Effusion", "anomaly_score"):
        np.testing.assert_allclose(ray_rows[col].to_numpy(float), local[col].to_numpy(float),
                                   atol=1e-6, equal_nan=True)
    bad = ray_rows[ray_rows["status"] != "ok"]
    assert sorted(Path(p).name for p in bad["image"]) == ["cut.png", "readme.txt"]
    assert bad["reason"].str.startswith(("truncated image", "not an image")).all()
    maps = ray_rows.loc[ray_rows["status"] == "ok", "Effusion_heatmap"]
    assert len(maps) == 20 and all(Path(m).is_file() for m in maps)
    assert metrics_file(out).is_file()
