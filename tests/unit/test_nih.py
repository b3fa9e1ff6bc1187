"""Metadata: the study's Table 1 on the real table, the label rule, both layouts, bad input."""

from __future__ import annotations

import gzip

import pytest

from cxr_ray.data import nih
from cxr_ray.errors import UserError

# docs/study.md §1, Table 1: images per class, exact label only / label anywhere.
TABLE_1 = {
    "No Finding": (60361, 60361), "Atelectasis": (4215, 11559), "Cardiomegaly": (1093, 2776),
    "Consolidation": (1310, 4667), "Edema": (628, 2303), "Emphysema": (892, 2516),
    "Effusion": (3955, 13317), "Fibrosis": (727, 1686), "Infiltration": (9547, 19894),
    "Mass": (2139, 5782), "Nodule": (2705, 6331), "Pneumothorax": (2194, 5302),
    "Pneumonia": (322, 1431), "Pleural_Thickening": (1126, 3385), "Hernia": (110, 227),
}

HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
               "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
HEADER_2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,"
               "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def _csv(tmp_path, rows, header=HEADER_2017, trailing=",", name="meta.csv"):
    path = tmp_path / name
    path.write_text(header + "".join(r + trailing + "\n" for r in rows))
    return path


ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171",
    "00000003_000.png,Hernia|Pleural_Thickening|Mass,0,3,74,F,AP,2500,2048,0.168,0.168",
]


def test_table_1_on_the_real_metadata(real_meta):
    assert len(real_meta) == 112_120
    assert real_meta[nih.PATIENT].nunique() == 30_805
    assert real_meta[nih.FINDINGS].nunique() == 836
    table = nih.class_table(real_meta)
    assert {k: (v["exact"], v["anywhere"]) for k, v in table.items()} == TABLE_1


def test_multi_label_rows_count_in_every_class_they_name(tmp_path):
    meta = nih.load_metadata(_csv(tmp_path, ROWS))
    table = nih.class_table(meta)
    assert table["Cardiomegaly"] == {"exact": 1, "anywhere": 2}
    assert table["Emphysema"] == {"exact": 0, "anywhere": 1}
    assert table["Mass"] == {"exact": 0, "anywhere": 1}
    assert table["Pleural_Thickening"]["anywhere"] == 1
    assert table["No Finding"] == {"exact": 1, "anywhere": 1}
    assert meta.loc[3, ["Hernia", "Pleural_Thickening", "Mass"]].all()
    assert not meta.loc[3, ["Pneumonia", "Nodule", "No Finding"]].any()


def test_labels_split_exactly_not_by_substring(tmp_path):
    # "Pleural_Thickening" must not count as anything else, and no label is a prefix match.
    meta = nih.load_metadata(_csv(tmp_path, ["a.png,Pleural_Thickening,0,1,1,M,PA,1,1,1,1"]))
    assert meta.loc[0, list(nih.LABELS)].sum() == 1


def test_2020_layout_gz_and_no_trailing_column(tmp_path):
    plain = nih.load_metadata(_csv(tmp_path, ROWS))
    path = tmp_path / "meta2020.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(HEADER_2020 + "".join(r + "\n" for r in ROWS))
    v2020 = nih.load_metadata(path)
    assert list(v2020.columns) == list(plain.columns)
    assert (v2020[nih.SEX] == plain[nih.SEX]).all()
    assert nih.class_table(v2020) == nih.class_table(plain)


@pytest.mark.parametrize("case, expect", [
    ("missing_column", r"missing column\(s\) 'Patient ID'"),
    ("unknown_label", r"line 3: unknown finding 'Pleural Thickening'.*did you mean 'Pleural_Thickening'"),
    ("duplicate", r"line 4: duplicate Image Index '00000001_000.png' \(first on line 2\)"),
    ("empty", r"is empty"),
    ("header_only", r"header but no rows"),
    ("binary", r"not a readable CSV"),
    ("not_nih", r"missing column"),
    ("mixed", r"line 2: 'No Finding\|Mass' combines"),
    ("bad_patient", r"line 2: Patient ID 'x' is not an integer"),
    ("missing_file", r"no such file"),
])
def test_bad_metadata_gives_one_clear_line(tmp_path, case, expect):
    path = tmp_path / "bad.csv"
    if case == "missing_column":
        path.write_text("Image Index,Finding Labels,Follow-up #,Patient Age,Patient Gender,View Position\n"
                        "a.png,Mass,0,1,M,PA\n")
    elif case == "unknown_label":
        path = _csv(tmp_path, [ROWS[0], "b.png,Pleural Thickening,0,2,1,M,PA,1,1,1,1"])
    elif case == "duplicate":
        path = _csv(tmp_path, [ROWS[0], ROWS[2], ROWS[0]])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "header_only":
        path.write_text(HEADER_2017)
    elif case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    elif case == "not_nih":
        path.write_text("hello world\nthis is not, a metadata file\n")
    elif case == "mixed":
        path = _csv(tmp_path, ["a.png,No Finding|Mass,0,1,1,M,PA,1,1,1,1"])
    elif case == "bad_patient":
        path = _csv(tmp_path, ["a.png,Mass,0,x,1,M,PA,1,1,1,1"])
    elif case == "missing_file":
        path = tmp_path / "nope.csv"
    with pytest.raises(UserError, match=expect) as info:
        nih.load_metadata(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
