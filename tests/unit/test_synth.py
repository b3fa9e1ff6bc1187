"""The embedded data set: NIH layout, real rows, deterministic, learnable but not trivial."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr_ray.data import cohorts, nih, synth


def test_layout_and_rows_are_real(tiny_synth, real_meta):
    meta = nih.load_metadata(tiny_synth / "Data_Entry_2017.csv")
    # Every row is a real NIH row, unchanged.
    real = real_meta.set_index(nih.IMAGE)
    mine = meta.set_index(nih.IMAGE)
    cols = [nih.FINDINGS, nih.PATIENT, "Follow-up #", "View Position", nih.SEX]
    assert (real.loc[mine.index, cols].astype(str).values == mine[cols].astype(str).values).all()
    # Every disease has at least the requested images, and No Finding as many as disease rows.
    table = nih.class_table(meta)
    assert all(table[d]["anywhere"] >= 3 for d in nih.DISEASES)
    assert table[nih.NO_FINDING]["anywhere"] == len(meta) - table[nih.NO_FINDING]["anywhere"]
    # One 8-bit grayscale PNG per row, at the requested size.
    files = sorted(p.name for p in (tiny_synth / "images").iterdir())
    assert files == sorted(meta[nih.IMAGE])
    with Image.open(tiny_synth / "images" / files[0]) as im:
        assert im.mode == "L" and im.size == (64, 64)


def test_split_lists_are_patient_wise_and_complete(tiny_synth):
    meta = nih.load_metadata(tiny_synth / "Data_Entry_2017.csv")
    train = (tiny_synth / "train_val_list.txt").read_text().split()
    test = (tiny_synth / "test_list.txt").read_text().split()
    assert sorted(train + test) == sorted(meta[nih.IMAGE]) and test
    pid = meta.set_index(nih.IMAGE)[nih.PATIENT]
    assert not set(pid[train]) & set(pid[test])
    # The lists drive the official split mode.
    built = cohorts.build_all(meta, cohorts.CohortConfig(split="official", split_dir=tiny_synth))
    assert set(built["Mass"].image_index[built["Mass"].split == "test"]) <= set(test)


def test_deterministic_per_seed_and_different_across_seeds(tmp_path, tiny_synth):
    again = synth.write_dataset(tmp_path / "again", per_class=3, size=64, seed=0, workers=1)
    assert again.images == len(list((tiny_synth / "images").iterdir()))
    for path in sorted((tiny_synth / "images").iterdir())[:10]:
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(tmp_path / "again" / "images" / path.name))
        assert (a == b).all()
    one = synth.draw_image("00000001_000.png", ("Mass",), 64, seed=1)
    zero = synth.draw_image("00000001_000.png", ("Mass",), 64, seed=0)
    assert (one != zero).any()


def test_findings_change_the_image():
    base = synth.draw_image("00000005_000.png", (nih.NO_FINDING,), 128, seed=3)
    for disease in nih.DISEASES:
        img = synth.draw_image("00000005_000.png", (disease,), 128, seed=3)
        assert np.abs(img.astype(int) - base).mean() > 0.3, disease


def test_png_size_is_realistic_at_1024():
    import io

    buf = io.BytesIO()
    Image.fromarray(synth.draw_image("00000009_000.png", ("Effusion",), 1024, 0)).save(buf, "PNG")
    assert 150_000 < len(buf.getvalue()) < 1_200_000  # real NIH PNGs: hundreds of KB


def test_boxes_say_where_each_reported_finding_was_drawn(tiny_synth):
    """BBox_List_2017.csv in NIH's layout: a box per drawn shape of every reported finding,
    inside the image, and the image differs from its No Finding twin mostly inside them."""
    boxes = synth.read_boxes(tiny_synth / synth.BBOX_FILE)
    header = (tiny_synth / synth.BBOX_FILE).read_text().splitlines()[0]
    assert header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    meta = nih.load_metadata(tiny_synth / "Data_Entry_2017.csv").set_index(nih.IMAGE)
    for row in boxes.itertuples():
        assert row.label in meta.loc[row.image, nih.FINDINGS].split("|")
        assert 0 <= row.x and 0 <= row.y and row.x + row.w <= 64.01 and row.y + row.h <= 64.01
    assert set(boxes["label"]) == set(nih.DISEASES)  # every disease is drawn somewhere
    healthy = meta.index[meta[nih.FINDINGS] == nih.NO_FINDING]
    assert not boxes["image"].isin(healthy).any()  # unreported findings get no box
    # drawn where it says: the finding changes the picture inside its box far more than
    # outside (outside, only the noise and exposure of a different random sequence differ)
    for disease in ("Mass", "Cardiomegaly", "Effusion"):
        found: list = []
        img = synth.draw_image("00000005_000.png", (disease,), 128, seed=3, boxes=found)
        base = synth.draw_image("00000005_000.png", (nih.NO_FINDING,), 128, seed=3)
        inside = np.zeros((128, 128), bool)
        for _, x, y, w, h in found:
            inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
        diff = np.abs(img.astype(int) - base)
        assert found and diff[inside].mean() > 3 * diff[~inside].mean(), disease


def test_single_finding_variant_has_one_label_per_row_and_no_label_noise(tmp_path):
    from cxr_ray import cli

    assert cli.main(["synth", "--out", str(tmp_path / "one"), "--per-class", "4", "--size", "32",
                     "--workers", "1", "--single-finding"]) == 0
    meta = nih.load_metadata(tmp_path / "one" / "Data_Entry_2017.csv")
    assert not meta[nih.FINDINGS].str.contains("|", regex=False).any()
    assert set(meta[nih.FINDINGS]) == set(nih.DISEASES) | {nih.NO_FINDING}
    # No Finding images: the default draws an unreported finding into about a fifth of them;
    # without label noise those (and only those) come out different.
    names = [f"{i:08d}_000.png" for i in range(1, 41)]
    differ = [n for n in names
              if not np.array_equal(synth.draw_image(n, (nih.NO_FINDING,), 64, 0),
                                    synth.draw_image(n, (nih.NO_FINDING,), 64, 0,
                                                     label_noise=False))]
    assert 2 <= len(differ) <= 16
