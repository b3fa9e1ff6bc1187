"""lr policies: hand-computed values, step-size semantics, torch cross-checks, exact resume
from a step count (the training loop owns the step)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cxr_ray.errors import UserError
from cxr_ray.optim.schedules import (
    CLR_POLICIES,
    POLICIES,
    PolicyConfig,
    PolicyLR,
    clr_lr,
    lr_at,
    one_cycle_lr,
    peaks,
    policy_lrs,
    time_decay_factor,
)

BASE, MAX, SS = 0.0075, 0.03, 4


def clr(name: str, **kw) -> PolicyConfig:
    return PolicyConfig(name=name, base_lr=BASE, max_lr=MAX, step_size=SS, **kw)


# --------------------------------------------------------------------------- hand values
def test_triangular_hand_values():
    lrs = policy_lrs(clr("triangular"), 17)
    expected = {0: 0.0075, 1: 0.013125, 2: 0.01875, 3: 0.024375, 4: 0.03, 6: 0.01875,
                8: 0.0075, 12: 0.03, 16: 0.0075}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-12), step


def test_triangular2_halves_every_cycle():
    lrs = policy_lrs(clr("triangular2"), 40)
    assert [lrs[s] for s in (4, 12, 20, 28, 36)] == pytest.approx(
        [0.03, 0.01875, 0.013125, 0.0103125, 0.00890625], rel=1e-12)
    amplitudes = [lrs[s] - BASE for s in (4, 12, 20, 28, 36)]
    for a, b in zip(amplitudes, amplitudes[1:]):
        assert b == pytest.approx(a / 2, rel=1e-12)


def test_modified_triangular2_study_peaks():
    lrs = policy_lrs(clr("modified_triangular2"), 48)
    assert [lrs[s] for s in (4, 12, 20, 28, 36, 44)] == pytest.approx(
        [0.03, 0.01875, 0.013125, 0.03, 0.01875, 0.013125], rel=1e-12)
    assert [lrs[s] for s in (0, 8, 16, 24, 32, 40)] == pytest.approx([BASE] * 6, rel=1e-12)


def test_exp_range_decays_by_gamma_per_step():
    g = 0.9
    cfg = clr("exp_range", gamma=g)
    assert lr_at(cfg, 4) == pytest.approx(0.0075 + 0.0225 * 0.9 ** 4, rel=1e-12)
    assert lr_at(cfg, 2) == pytest.approx(0.0075 + 0.0225 * 0.5 * 0.81, rel=1e-12)
    assert lr_at(cfg, 12) == pytest.approx(0.0075 + 0.0225 * 0.9 ** 12, rel=1e-12)
    # amplitude / triangle height = (max - base) * gamma**it: a factor gamma per step
    heights = {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 5: 0.75, 6: 0.5, 7: 0.25}
    amp = {it: (lr_at(cfg, it) - BASE) / h for it, h in heights.items()}
    for it in range(1, 7):
        assert amp[it + 1] / amp[it] == pytest.approx(g, rel=1e-9)


@pytest.mark.parametrize("name", CLR_POLICIES)
@pytest.mark.parametrize("step_size", [1, 4, 5])
def test_step_size_semantics(name, step_size):
    cfg = PolicyConfig(name=name, base_lr=0.01, max_lr=0.05, step_size=step_size, gamma=0.99)
    lrs = policy_lrs(cfg, 2 * step_size + 1)
    assert lrs[0] == pytest.approx(0.01)
    assert max(range(len(lrs)), key=lrs.__getitem__) == step_size
    assert lrs[2 * step_size] == pytest.approx(0.01)
    assert all(0.01 - 1e-15 <= lr <= 0.05 + 1e-15 for lr in lrs)


def test_constant_and_time_decay():
    assert policy_lrs(PolicyConfig("constant", base_lr=0.02), 3) == [0.02, 0.02, 0.02]
    cfg = PolicyConfig("time_decay", base_lr=0.01, decay=0.001)
    assert lr_at(cfg, 0) == 0.01
    assert lr_at(cfg, 1000) == pytest.approx(0.005)
    assert lr_at(cfg, 3) == pytest.approx(0.01 / 1.003)
    assert time_decay_factor(10, 0.1) == pytest.approx(0.5)


def test_clr_times_keras_time_decay():
    """Keras: a CLR callback sets lr, SGD(decay) divides by 1 + decay*iterations."""
    cfg = clr("triangular", decay=0.01)
    for t in (0, 2, 4, 12, 33):
        assert lr_at(cfg, t) == pytest.approx(
            clr_lr(t, BASE, MAX, SS, "triangular") / (1 + 0.01 * t), rel=1e-12)
    assert lr_at(cfg, 4) == pytest.approx(0.03 / 1.04)


def test_one_cycle_shape():
    cfg = PolicyConfig("one_cycle", base_lr=0.001, max_lr=0.1, total_steps=100)
    lrs = policy_lrs(cfg, 110)
    assert lrs[0] == pytest.approx(0.001)
    assert max(range(100), key=lrs.__getitem__) == 29  # torch: peak at pct_start*total - 1
    assert lrs[29] == pytest.approx(0.1)
    assert lrs[99] == pytest.approx(0.001 / 1e4)
    assert lrs[109] == lrs[99]  # held after the end instead of torch's error


def test_peaks_helper():
    lrs = policy_lrs(clr("modified_triangular2"), 40)
    assert [s for s, _ in peaks(lrs)] == [4, 12, 20, 28, 36]


# --------------------------------------------------------------------------- torch cross-checks
class _ScaleFn:
    """Picklable scale function for torch's CyclicLR (a plain function would not be saved)."""

    def __init__(self, mode: str, gamma: float = 1.0):
        self.mode, self.gamma = mode, gamma

    def __call__(self, x):
        if self.mode == "modified_triangular2":
            return 1.0 / (2.0 ** ((x - 1) % 3))
        if self.mode == "triangular2":
            return 1.0 / (2.0 ** (x - 1))
        if self.mode == "exp_range":
            return self.gamma ** x
        return 1.0


def _opt(lr=0.1, kind="sgd"):
    p = torch.nn.Parameter(torch.zeros(2))
    if kind == "adam":
        return torch.optim.Adam([p], lr=lr)
    if kind == "rmsprop":
        return torch.optim.RMSprop([p], lr=lr, momentum=0.5)
    return torch.optim.SGD([p], lr=lr, momentum=0.9)


@pytest.mark.parametrize("name", CLR_POLICIES)
def test_matches_torch_cycliclr(name):
    opt = _opt()
    scale_mode = "iterations" if name == "exp_range" else "cycle"
    ref = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=BASE, max_lr=MAX, step_size_up=SS, step_size_down=None,
        scale_fn=_ScaleFn(name, 0.95), scale_mode=scale_mode, cycle_momentum=False)
    torch_lrs = []
    for _ in range(40):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = policy_lrs(clr(name, gamma=0.95), 40)
    assert ours == pytest.approx(torch_lrs, rel=1e-12, abs=1e-15)


def test_one_cycle_matches_torch_onecyclelr():
    opt = _opt()
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=50, div_factor=100,
                                              final_div_factor=1e4, cycle_momentum=False)
    torch_lrs = []
    for _ in range(50):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    cfg = PolicyConfig("one_cycle", base_lr=0.001, max_lr=0.1, total_steps=50)
    assert policy_lrs(cfg, 50) == pytest.approx(torch_lrs, rel=1e-12, abs=1e-18)
    assert one_cycle_lr(10, 50, 0.001, 0.1) == pytest.approx(torch_lrs[10], rel=1e-12)


# --------------------------------------------------------------------------- the scheduler
ALL_CONFIGS = {
    "constant": PolicyConfig("constant", base_lr=0.02),
    "time_decay": PolicyConfig("time_decay", base_lr=0.02, decay=0.01),
    "triangular": clr("triangular"),
    "triangular2": clr("triangular2"),
    "exp_range": clr("exp_range", gamma=0.97),
    "modified_triangular2": clr("modified_triangular2"),
    "one_cycle": PolicyConfig("one_cycle", base_lr=0.001, max_lr=0.03, total_steps=30),
    "triangular+decay": clr("triangular", decay=0.005),
    "modified_triangular2+decay": clr("modified_triangular2", decay=0.005),
    "triangular+cycle_momentum": clr("triangular", cycle_momentum=True),
    "one_cycle+cycle_momentum": PolicyConfig("one_cycle", base_lr=0.001, max_lr=0.03,
                                             total_steps=30, cycle_momentum=True),
    # warmup 6 steps: the resume at step 7 is just past the peak
    "warmup_cosine": PolicyConfig("warmup_cosine", base_lr=0.001, max_lr=0.03, total_steps=30,
                                  warmup_pct=0.2),
    # warmup 10 steps: the resume at step 7 is mid-warmup
    "warmup_cosine+mid_warmup": PolicyConfig("warmup_cosine", base_lr=0.001, max_lr=0.03,
                                             total_steps=20, warmup_pct=0.5),
    # periods 4, 8, 16: restarts at 4 and 12, the resume at step 7 is mid-period
    "sgdr": PolicyConfig("sgdr", base_lr=0.001, max_lr=0.03, step_size=2, t_mult=2),
    "sgdr+decay": clr("sgdr", decay=0.005),
}


def test_every_policy_is_covered():
    assert {c.name for c in ALL_CONFIGS.values()} == set(POLICIES)


@pytest.mark.parametrize("key", list(ALL_CONFIGS))
def test_scheduler_sets_lr_in_force_at_each_step(key):
    cfg = ALL_CONFIGS[key]
    opt = _opt(lr=123.0)
    sched = PolicyLR(opt, cfg)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
        opt.step()
        sched.step()
    assert seen == policy_lrs(cfg, 25)
    assert sched.get_last_lr() == [lr_at(cfg, 25)]


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, x, y


def _train(model, opt, policy, x, y, start, steps):
    """Steps ``start .. start+steps-1`` as the training loop runs them: ``policy.step(step)``
    sets the lr of the step before its optimizer step."""
    lrs = []
    for step in range(start, start + steps):
        policy.step(step)
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return lrs


@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
@pytest.mark.parametrize("key", list(ALL_CONFIGS))
def test_resume_from_step_mid_cycle_continues_identically(key, kind):
    cfg = ALL_CONFIGS[key]

    def make(model):
        if kind == "adam":
            return torch.optim.Adam(model.parameters(), lr=1.0)
        if kind == "rmsprop":
            return torch.optim.RMSprop(model.parameters(), lr=1.0, momentum=0.5)
        return torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)

    # uninterrupted: 7 + 13 steps (7 is mid-cycle: step size 4)
    model, x, y = _tiny_problem()
    opt = make(model)
    full = _train(model, opt, PolicyLR(opt, cfg), x, y, 0, 20)
    final = [p.detach().clone() for p in model.parameters()]
    assert full == policy_lrs(cfg, 20)

    # interrupted after 7 steps; the checkpoint holds weights, optimizer state and the step
    # (through torch.save / weights_only load); a fresh policy continues from the step
    model, x, y = _tiny_problem()
    opt = make(model)
    first = _train(model, opt, PolicyLR(opt, cfg), x, y, 0, 7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": 7}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2, _, _ = _tiny_problem(seed=99)  # different init: everything must come from ckpt
    opt2 = make(model2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    rest = _train(model2, opt2, PolicyLR(opt2, cfg), x, y, ckpt["step"], 13)

    assert first + rest == full
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("key", [k for k, c in ALL_CONFIGS.items() if not c.cycle_momentum])
@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
def test_momentum_untouched(key, kind):
    opt = _opt(kind=kind)
    before = {k: v for k, v in opt.param_groups[0].items() if k in ("momentum", "betas")}
    sched = PolicyLR(opt, ALL_CONFIGS[key])
    for _ in range(12):
        opt.step()
        sched.step()
    after = {k: v for k, v in opt.param_groups[0].items() if k in ("momentum", "betas")}
    assert after == before


def test_cycle_momentum_on_request():
    opt = _opt(kind="sgd")
    sched = PolicyLR(opt, clr("triangular", cycle_momentum=True))
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)  # lr at base: momentum max
    sched.step(4)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)  # lr at peak: momentum base
    opt = _opt(kind="adam")
    sched = PolicyLR(opt, clr("triangular", cycle_momentum=True))
    sched.step(2)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.90, 0.999))


def test_step_with_explicit_index_and_group_scale():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr_scale": 0.1}], lr=1.0)
    sched = PolicyLR(opt, clr("triangular"))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([BASE, BASE * 0.1])
    sched.step(12)
    assert sched.last_epoch == 12
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([MAX, MAX * 0.1])
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(clr("triangular"), 13))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("cfg, message", [
    (PolicyConfig("cosine", base_lr=0.1), "unknown lr policy 'cosine'; valid: constant"),
    (PolicyConfig("triangular", base_lr=0.1, max_lr=0.01, step_size=4), "must not exceed"),
    (PolicyConfig("triangular", base_lr=0.01, max_lr=0.1, step_size=0), "step_size must be"),
    (PolicyConfig("triangular", base_lr=0.01, max_lr=0.1), "needs step_size"),
    (PolicyConfig("triangular2", base_lr=0.01, step_size=3), "needs max_lr"),
    (PolicyConfig("exp_range", base_lr=0.01, max_lr=0.1, step_size=3, gamma=1.5), "gamma in"),
    (PolicyConfig("exp_range", base_lr=0.01, max_lr=0.1, step_size=3, gamma=0.0), "gamma in"),
    (PolicyConfig("one_cycle", base_lr=0.01, max_lr=0.1), "total_steps"),
    (PolicyConfig("time_decay", base_lr=0.01, decay=-1), "decay must be"),
    (PolicyConfig("constant", base_lr=0.01, cycle_momentum=True), "cycle_momentum"),
])
def test_validation_errors(cfg, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        cfg.validate()


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(UserError, match="unknown lr policy field"):
        PolicyConfig.from_dict({"name": "constant", "lr": 0.1})
    assert PolicyConfig.from_dict(clr("triangular").to_dict()) == clr("triangular")
    assert math.isclose(lr_at(clr("triangular"), 4), MAX)
