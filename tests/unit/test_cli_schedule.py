"""`cxr-ray schedule`: the acceptance command, JSON/plot output, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cxr_ray.cli import main

ACCEPTANCE = ["schedule", "--policy", "modified_triangular2", "--base-lr", "0.0075",
              "--max-lr", "0.03", "--step-size", "4", "--steps", "40", "--json"]


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["lr"]


def test_acceptance_modified_triangular2_peaks(capsys):
    lrs = _json(capsys, ACCEPTANCE)
    assert len(lrs) == 40
    assert [lrs[s] for s in (4, 12, 20, 28, 36)] == pytest.approx(
        [0.03, 0.01875, 0.013125, 0.03, 0.01875], rel=1e-12)
    assert lrs[0] == lrs[8] == lrs[16] == 0.0075
    peaks = [i for i in range(1, 39) if lrs[i - 1] < lrs[i] >= lrs[i + 1]]
    assert peaks == [4, 12, 20, 28, 36]


def test_text_summary_lists_peaks(capsys):
    assert main(ACCEPTANCE[:-1]) == 0
    out = capsys.readouterr().out
    assert "peaks (lr @ step): 0.03 @ 4, 0.01875 @ 12, 0.013125 @ 20, 0.03 @ 28, 0.01875 @ 36" in out


def test_other_policies(capsys):
    tri2 = _json(capsys, ["schedule", "--policy", "triangular2", "--base-lr", "0.0075",
                          "--max-lr", "0.03", "--step-size", "4", "--steps", "21", "--json"])
    assert [tri2[s] for s in (4, 12, 20)] == pytest.approx([0.03, 0.01875, 0.013125])
    decay = _json(capsys, ["schedule", "--policy", "time_decay", "--base-lr", "0.01",
                           "--decay", "0.001", "--steps", "1001", "--json"])
    assert decay[0] == 0.01 and decay[1000] == pytest.approx(0.005)
    composed = _json(capsys, ["schedule", "--policy", "triangular", "--base-lr", "0.0075",
                              "--max-lr", "0.03", "--step-size", "4", "--steps", "5",
                              "--decay", "0.01", "--json"])
    assert composed[4] == pytest.approx(0.03 / 1.04)
    exp = _json(capsys, ["schedule", "--policy", "exp_range", "--base-lr", "0.0075", "--max-lr",
                         "0.03", "--step-size", "4", "--steps", "5", "--gamma", "0.9", "--json"])
    assert exp[4] == pytest.approx(0.0075 + 0.0225 * 0.9 ** 4)
    one = _json(capsys, ["schedule", "--policy", "one_cycle", "--base-lr", "0.001", "--max-lr",
                         "0.1", "--steps", "100", "--json"])
    assert one[0] == pytest.approx(0.001) and max(one) == pytest.approx(0.1) and len(one) == 100


def test_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "fig4.png"
    assert main(["schedule", "--policy", "triangular", "--base-lr", "0.0075", "--max-lr", "0.03",
                 "--step-size", "542", "--steps", str(36 * 271), "--steps-per-epoch", "271",
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.03 @ 542" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--policy", "cosine", "--base-lr", "0.01", "--max-lr", "0.1", "--step-size", "4"],
     "unknown lr policy 'cosine'; valid: constant, time_decay, triangular, triangular2, "
     "exp_range, modified_triangular2, one_cycle"),
    (["--policy", "triangular", "--base-lr", "0.1", "--max-lr", "0.01", "--step-size", "4"],
     "base_lr (0.1) must not exceed max_lr (0.01)"),
    (["--policy", "triangular", "--base-lr", "0.01", "--max-lr", "0.1", "--step-size", "0"],
     "step_size must be >= 1"),
    (["--policy", "triangular", "--base-lr", "0.01", "--max-lr", "0.1"], "needs step_size"),
    (["--policy", "exp_range", "--base-lr", "0.01", "--max-lr", "0.1", "--step-size", "4",
      "--gamma", "1.5"], "exp_range needs gamma in (0, 1]"),
])
def test_errors_exit_2_with_one_line(capsys, extra, message):
    assert main(["schedule", *extra, "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert err.startswith("cxr-ray schedule: error: ") and message in err


def test_steps_must_be_positive(capsys):
    assert main(["schedule", "--policy", "constant", "--base-lr", "0.01", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_console_entry_point():
    proc = subprocess.run([sys.executable, "-m", "cxr_ray.cli", *ACCEPTANCE],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["lr"][12] == pytest.approx(0.01875)
