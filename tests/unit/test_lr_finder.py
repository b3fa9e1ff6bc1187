"""LR range test: ramp, smoothing, divergence stop, suggestion rules, the result's files, and a
problem whose good lr range is established independently by plain training.

The range test of a real run (cxr_ray.train.lr_find.range_test, which leaves the trained run
untouched) is tested in tests/unit/test_loop.py; here a small loop drives :class:`LrRangeTest`
the same way."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxr_ray.errors import UserError
from cxr_ray.optim.lr_finder import (
    LrRangeConfig,
    LrRangeResult,
    LrRangeTest,
    suggest,
    valley_index,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and immune to a busy machine
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the core
def test_exponential_ramp():
    t = LrRangeTest(LrRangeConfig(min_lr=1e-7, max_lr=1.0, num_steps=8))
    lrs = [t.lr_at(i) for i in range(8)]
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([10.0] * 7)  # 7 decades in 7 steps


def test_smoothing_with_bias_correction():
    t = LrRangeTest(LrRangeConfig(num_steps=10, smoothing=0.5))
    t.record(0, 1.0)
    t.record(1, 2.0)
    t.record(2, 2.0)
    # avg: 0.5, 1.25, 1.625; corrected by 1 - 0.5**k: 1, 1.25/0.75, 1.625/0.875
    assert t.smoothed == pytest.approx([1.0, 5 / 3, 13 / 7])
    assert t.losses == [1.0, 2.0, 2.0]


def test_divergence_and_nan_stop():
    t = LrRangeTest(LrRangeConfig(num_steps=100, smoothing=0.0, diverge_factor=4.0))
    assert [t.record(i, v) for i, v in enumerate([2.0, 1.0, 3.9])] == [False] * 3
    assert t.record(3, 4.1) is True  # 4.1 > 4 x best (1.0)
    assert "diverged at step 3" in t.stop_reason
    t = LrRangeTest(LrRangeConfig(num_steps=100))
    assert t.record(0, 1.0) is False
    assert t.record(1, float("nan")) is True and len(t.losses) == 1
    t = LrRangeTest(LrRangeConfig(num_steps=3, smoothing=0.0))
    assert [t.record(i, 1.0) for i in range(3)] == [False, False, True]  # end of the ramp


def test_suggestion_rules_hand_values():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    losses = [1.0, 0.9, 0.5, 0.3, 2.0]
    assert suggest(lrs, losses, "paper") == 1e-1  # lr at minimum loss
    # slopes per log-lr step: -0.1, -0.4, -0.2, +1.7 → steepest fall starts at 1e-3
    assert suggest(lrs, losses, "steepest") == 1e-3
    # fastai valley: 10 strictly falling points end at index 9 (length 10) → start -1,
    # sections 10/3 → index -1 + 3 + 1 = 3
    falling = [10.0 - i for i in range(10)] + [20.0, 30.0]
    assert valley_index(np.array(falling)) == 3
    # a bump interrupts nothing in a longest decreasing *subsequence*
    bumpy = [5.0, 4.0, 4.5, 3.0, 2.0, 1.0, 9.0]
    assert valley_index(np.array(bumpy)) == 1  # end 5, length 5, start 0: 0 + int(5/3) + 0
    with pytest.raises(UserError, match="unknown suggestion rule 'median'"):
        suggest(lrs, losses, "median")


def test_config_validation():
    with pytest.raises(UserError, match="min_lr < max_lr"):
        LrRangeConfig(min_lr=1.0, max_lr=0.1).validate()
    with pytest.raises(UserError, match="unknown suggestion rule"):
        LrRangeConfig(rule="magic").validate()
    with pytest.raises(UserError, match="num_steps >= 2"):
        LrRangeConfig(num_steps=1).validate()


# --------------------------------------------------------------------------- a driving loop
def _blobs(seed: int, n: int = 256, batch: int = 32):
    """Two overlapping classes in 2-D (noisy linear boundary), in minibatches of 32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g)) > 0).float()
    return x, y, [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))


def _bce(out, target):
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), target)


def _range_test(model: nn.Module, opt: torch.optim.Optimizer, batches: list, **config
                ) -> LrRangeResult:
    """The loop contract of :class:`LrRangeTest`: the lr of step ``i`` on every param group, one
    optimizer step, record the loss, stop when told; batches are cycled."""
    test = LrRangeTest(LrRangeConfig(**config))
    model.train()
    for i in range(test.num_steps):
        xb, yb = batches[i % len(batches)]
        for group in opt.param_groups:
            group["lr"] = test.lr_at(i)
        opt.zero_grad()
        loss = _bce(model(xb), yb)
        loss.backward()
        opt.step()
        if test.record(i, loss.item()):
            break
    return test.result()


def _good_lr_range(seed: int, grid: np.ndarray, steps: int = 32) -> tuple[float, float]:
    """Independently: the lrs at which 32 steps of plain SGD (momentum 0.9) from the same start
    stay finite and cut the full-data loss by at least 25 %."""
    x, y, batches = _blobs(seed)
    good = []
    for lr in grid:
        model = _mlp(seed)
        opt = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=0.9)
        with torch.no_grad():
            before = _bce(model(x), y).item()
        for s in range(steps):
            xb, yb = batches[s % len(batches)]
            opt.zero_grad()
            _bce(model(xb), yb).backward()
            opt.step()
        with torch.no_grad():
            after = _bce(model(x), y).item()
        if math.isfinite(after) and after < 0.75 * before:
            good.append(float(lr))
    assert good, "the problem must have a good range"
    # the good set must be one contiguous stretch of the grid for the range to mean something
    idx = [int(np.argmin(np.abs(grid - g))) for g in good]
    assert idx == list(range(idx[0], idx[-1] + 1))
    return min(good), max(good)


@pytest.mark.parametrize("seed", [0, 3])
def test_suggests_a_range_inside_the_known_good_range(seed):
    lo, hi = _good_lr_range(seed, np.logspace(-4, 2, 25))
    assert lo < 0.05 and hi > 1.0  # sanity: a wide, well-defined range on this problem
    x, y, batches = _blobs(seed)
    model = _mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = _range_test(model, opt, batches, min_lr=1e-5, max_lr=100.0, num_steps=100)
    assert result.stopped_early and "diverged" in result.stop_reason
    assert lo <= result.base_lr < result.max_lr <= hi  # the study's rule: (max/4, max)
    assert result.base_lr == pytest.approx(result.max_lr / 4)
    for rule in ("steepest", "valley"):
        assert lo <= result.suggestions[rule] <= hi, rule


def test_result_round_trips_plots_and_needs_three_points(tmp_path):
    x, y, batches = _blobs(1)
    model = _mlp(1)
    result = _range_test(model, torch.optim.Adam(model.parameters()), batches, min_lr=1e-4,
                         max_lr=10.0, num_steps=30, rule="valley")
    assert len(result.lrs) >= 3
    again = LrRangeResult.from_dict(json.loads(result.to_json()))
    assert again == result and again.rule == "valley" and again.bounds() == result.bounds()
    png = result.plot(tmp_path / "lr_find.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="recorded only 0 step"):
        LrRangeTest(LrRangeConfig(num_steps=10)).result()
