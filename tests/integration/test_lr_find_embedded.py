"""The LR range test on the embedded data is stable across ramp lengths and reports a spread:
from the demo's stage-1 Effusion model (the cohort of the ramp-length report that led to the
ramp-scaled analysis), 30- and 300-step ramps over the demo's lr range, three batch orders
each. The paper rule's median moves less than 3x between them, and the 300-step curve read at
30 points gives the same bounds as read at 300 (the analysis itself does not depend on the
number of points). No Ray: ``bench/lr_find.py`` (run here) drives the loop's range test in
this process. About 1.5 minutes on 2 cores, the data set included."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("lr_find_bench", ROOT / "bench" / "lr_find.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median(values):
    return float(np.exp(np.median(np.log(values))))


def test_paper_rule_agrees_between_30_and_300_steps_on_the_embedded_data(tmp_path):
    out = tmp_path / "bench.json"
    assert _bench().main(["--data", str(tmp_path / "data"), "--shards", str(tmp_path / "shards"),
                          "--cohorts", "Effusion", "--ramps", "30", "300", "--no-results",
                          "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["steps"], r["seed"]) for r in rows) == [(30, 0), (30, 1), (30, 2),
                                                             (300, 0), (300, 1), (300, 2)]
    paper = {n: [r["after"]["paper"] for r in rows if r["steps"] == n] for n in (30, 300)}
    short, long = _median(paper[30]), _median(paper[300])
    assert 1 / 3 <= long / short <= 3, paper
    assert 1e-5 < short < 1.0 and 1e-5 < long < 1.0
    assert max(paper[300]) > min(paper[300])  # the batch order matters: a spread to report
    equal = _median([r["equal_epochs"]["paper"] for r in rows if r["steps"] == 300])
    assert 1 / 1.5 <= equal / long <= 1.5, (equal, long)
