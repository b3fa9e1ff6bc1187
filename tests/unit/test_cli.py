"""The `cxr-ray` command line as a user runs it: exit codes, JSON shape, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_nih import TABLE_1

CLI = [sys.executable, "-m", "cxr_ray.cli"]


def run(*args, check=True):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cohorts_json_on_the_default_metadata():
    out = json.loads(run("cohorts", "--json").stdout)
    assert {k: (v["exact"], v["anywhere"]) for k, v in out["classes"].items()} == TABLE_1
    assert len(out["cohorts"]) == 15 and "OneClass" in out["cohorts"]
    row = out["cohorts"]["Atelectasis"]
    assert set(row) == {"positives", "negatives", "train", "val", "test", "train_patients",
                        "val_patients", "test_patients"}
    assert row["positives"] == 11559 and row["negatives"] == 11559
    assert row["train"] + row["val"] + row["test"] == 2 * 11559
    # 70 / 10 / 20 by patient: the study's test fraction; 1/8 of the training side validates
    assert abs(row["test"] / (2 * 11559) - 0.2) < 0.005
    assert abs(row["val"] / (row["train"] + row["val"]) - 0.125) < 0.005


def test_cohorts_table_and_synth_round_trip(tmp_path):
    proc = run("synth", "--out", str(tmp_path), "--per-class", "2", "--size", "48", "--seed", "5")
    assert "images/s" in proc.stdout
    table = run("cohorts", "--metadata", str(tmp_path / "Data_Entry_2017.csv"),
                "--split", "official").stdout
    assert "Pleural_Thickening" in table and "OneClass" in table and "train pat." in table
    only = json.loads(run("cohorts", "--cohort", "hernia", "--cohort", "OneClass", "--json").stdout)
    assert list(only["cohorts"]) == ["Hernia", "OneClass"]


@pytest.mark.parametrize("args, expect", [
    (["cohorts", "--metadata", "{tmp}/missing.csv"], "missing.csv: no such file"),
    (["cohorts", "--metadata", "{tmp}/dup.csv"], "duplicate Image Index"),
    (["cohorts", "--metadata", "{tmp}/dup.csv", "--split", "official"], "duplicate Image Index"),
    (["cohorts", "--split", "official"], "--split official needs --split-dir"),
    (["synth", "--out", "{tmp}/s", "--per-class", "0"], "--per-class 0: must be at least 1"),
    (["cohorts", "--cohort", "Covid"], "unknown cohort 'Covid'; valid cohorts: Atelectasis,"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, args, expect):
    (tmp_path / "dup.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "a.png,Mass,0,1,50,M,PA\na.png,Mass,0,1,50,M,PA\n")
    proc = run(*[a.format(tmp=tmp_path) for a in args], check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
