"""The two modern cosine baselines beside the study's policies: ``warmup_cosine`` (linear warmup +
cosine decay) and ``sgdr`` (cosine with warm restarts). Torch / transformers cross-checks, hand
values, purity in the step (resume), one-line validation errors, ``describe_policy``, the
sweep recipe's grid and the trainer's plan."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from cxr_ray.errors import UserError
from cxr_ray.optim.schedules import (
    BOUNDED_POLICIES,
    POLICIES,
    TOTAL_STEPS_POLICIES,
    PolicyConfig,
    PolicyLR,
    describe_policy,
    lr_at,
    peaks,
    policy_lrs,
    sgdr_lr,
    sgdr_period,
    warmup_cosine_lr,
    warmup_steps,
)

JOBS = Path(__file__).resolve().parents[2] / "jobs"
BASE, MAX = 0.0075, 0.03


def wc(total_steps: int = 100, warmup_pct: float = 0.05, **kw) -> PolicyConfig:
    return PolicyConfig("warmup_cosine", base_lr=kw.pop("base_lr", BASE), max_lr=MAX,
                        total_steps=total_steps, warmup_pct=warmup_pct, **kw)


def sgdr(step_size: float = 4, t_mult: int = 1, **kw) -> PolicyConfig:
    return PolicyConfig("sgdr", base_lr=kw.pop("base_lr", BASE), max_lr=MAX,
                        step_size=step_size, t_mult=t_mult, **kw)


def _torch_lrs(opt, sched, steps: int) -> list[float]:
    """The lr each of ``steps`` optimizer steps uses under a torch scheduler."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _opt(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


def test_registered_after_the_study_policies():
    assert POLICIES[-2:] == ("warmup_cosine", "sgdr")
    assert POLICIES[:7] == ("constant", "time_decay", "triangular", "triangular2", "exp_range",
                            "modified_triangular2", "one_cycle")
    assert {"warmup_cosine", "sgdr"} <= set(BOUNDED_POLICIES)
    assert "warmup_cosine" in TOTAL_STEPS_POLICIES and "sgdr" not in TOTAL_STEPS_POLICIES


# --------------------------------------------------------------------------- sgdr vs torch
@pytest.mark.parametrize("t_0, t_mult", [(2, 1), (8, 1), (2, 2), (6, 2), (5, 3), (3, 1)])
def test_sgdr_matches_torch_cosine_annealing_warm_restarts(t_0, t_mult):
    """torch's optimizer lr is our max_lr, its eta_min our base_lr, its T_0 is 2*step_size."""
    steps = 400
    opt = _opt(MAX)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult,
                                                               eta_min=BASE)
    torch_lrs = _torch_lrs(opt, ref, steps)
    ours = policy_lrs(sgdr(step_size=t_0 / 2, t_mult=t_mult), steps)
    assert ours == pytest.approx(torch_lrs, rel=1e-12, abs=1e-15)


def test_sgdr_matches_torch_with_base_lr_zero_and_many_restarts():
    opt = _opt(0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2)
    torch_lrs = _torch_lrs(opt, ref, 2000)  # restarts at 10, 30, 70, 150, 310, 630, 1270
    cfg = PolicyConfig("sgdr", base_lr=0.0, max_lr=0.1, step_size=5, t_mult=2)
    assert policy_lrs(cfg, 2000) == pytest.approx(torch_lrs, rel=1e-12, abs=1e-15)


def test_sgdr_hand_values_and_restarts():
    # period 8 (= 2 x step size 4), t_mult 2: periods 8, 16, 32; restarts at 8, 24, 56
    cfg = sgdr(step_size=4, t_mult=2)
    amp = MAX - BASE
    assert lr_at(cfg, 0) == MAX
    assert lr_at(cfg, 4) == pytest.approx(BASE + amp / 2, rel=1e-12)  # half way: cos(pi/2)
    assert lr_at(cfg, 7) == pytest.approx(BASE + amp * (1 + math.cos(math.pi * 7 / 8)) / 2)
    assert lr_at(cfg, 8) == MAX
    assert lr_at(cfg, 16) == pytest.approx(BASE + amp / 2, rel=1e-12)
    assert lr_at(cfg, 24) == MAX and lr_at(cfg, 56) == MAX
    assert [sgdr_period(t, 8, 2) for t in (0, 7, 8, 23, 24, 55, 56)] == [
        (0, 8), (7, 8), (0, 16), (15, 16), (0, 32), (31, 32), (0, 64)]
    lrs = policy_lrs(cfg, 60)
    assert [s for s, _ in peaks(lrs)] == [8, 24, 56]
    assert min(lrs) > BASE and max(lrs) == MAX
    # t_mult 1: every period is 2*step_size
    assert [s for s, _ in peaks(policy_lrs(sgdr(step_size=3), 40))] == [6, 12, 18, 24, 30, 36]
    assert sgdr_lr(13, BASE, MAX, 6) == lr_at(sgdr(step_size=3), 13)


def test_sgdr_period_is_one_clr_cycle():
    """With t_mult 1, sgdr restarts where triangular is back at base_lr (every 2*step_size)."""
    tri = policy_lrs(PolicyConfig("triangular", base_lr=BASE, max_lr=MAX, step_size=5), 41)
    cos = policy_lrs(sgdr(step_size=5), 41)
    assert [i for i, lr in enumerate(tri) if lr == BASE] == [0, 10, 20, 30, 40]
    assert [i for i, lr in enumerate(cos) if lr == MAX] == [0, 10, 20, 30, 40]


# --------------------------------------------------------------------------- warmup_cosine
def _transformers_multiplier(step: int, warmup: int, total: int) -> float:
    """transformers' ``get_cosine_schedule_with_warmup`` lr_lambda (num_cycles=0.5), as written
    there; the floor of 0 is reached at ``total`` and held after (the library lets the cosine
    rise again past ``total``; we do not train past it)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * min(progress, 1.0))))


@pytest.mark.parametrize("total, pct", [(100, 0.05), (50, 0.1), (37, 0.29), (20, 0.0),
                                        (10, 0.9), (7, 0.5), (1, 0.0)])
def test_warmup_cosine_closed_form(total, pct):
    w = round(pct * total)
    cfg = wc(total, pct)
    lrs = policy_lrs(cfg, total + 5)
    expected = [BASE + (MAX - BASE) * _transformers_multiplier(t, w, total)
                for t in range(total + 5)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # base_lr 0: exactly transformers' schedule through torch's LambdaLR
    opt = _opt(MAX)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: _transformers_multiplier(t, w, total))
    zero = policy_lrs(wc(total, pct, base_lr=0.0), total)
    assert zero == pytest.approx(_torch_lrs(opt, lam, total), rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("total, pct", [(100, 0.05), (60, 0.25), (37, 0.29)])
def test_warmup_cosine_matches_torch_linear_then_cosine(total, pct):
    """torch's LinearLR (base_lr/max_lr -> 1 over W steps) then CosineAnnealingLR(T_max = T - W,
    eta_min = base_lr) in a SequentialLR switching at W."""
    w = round(pct * total)
    opt = _opt(MAX)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=BASE / MAX, end_factor=1.0,
                                             total_iters=w)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - w, eta_min=BASE)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[w])
    torch_lrs = _torch_lrs(opt, seq, total)
    assert policy_lrs(wc(total, pct), total) == pytest.approx(torch_lrs, rel=1e-12)


def test_warmup_cosine_hand_values():
    cfg = wc(total_steps=10, warmup_pct=0.2)  # W = 2, cosine over steps 2..10
    amp = MAX - BASE
    assert warmup_steps(10, 0.2) == 2
    assert lr_at(cfg, 0) == BASE
    assert lr_at(cfg, 1) == pytest.approx(BASE + amp / 2, rel=1e-12)
    assert lr_at(cfg, 2) == MAX
    assert lr_at(cfg, 6) == pytest.approx(BASE + amp / 2, rel=1e-12)  # p = 4/8
    assert lr_at(cfg, 9) == pytest.approx(BASE + amp * (1 + math.cos(math.pi * 7 / 8)) / 2)
    assert lr_at(cfg, 10) == BASE and lr_at(cfg, 1000) == BASE  # held after the run
    assert [s for s, _ in peaks(policy_lrs(cfg, 10))] == [2]
    assert warmup_cosine_lr(6, 10, BASE, MAX, 0.2) == lr_at(cfg, 6)
    # no warmup: plain cosine from the peak (torch CosineAnnealingLR, T_max = total)
    assert lr_at(wc(10, 0.0), 0) == MAX and lr_at(wc(10, 0.0), 5) == pytest.approx(
        BASE + amp / 2, rel=1e-12)
    # round(), not floor(): 0.29 * 100 is 28.999999999999996 in binary
    assert warmup_steps(100, 0.29) == 29


def test_both_compose_with_keras_time_decay():
    for cfg in (wc(40, 0.1, decay=0.01), sgdr(3, 2, decay=0.01)):
        plain = PolicyConfig.from_dict({**cfg.to_dict(), "decay": 0.0})
        for t in (0, 3, 4, 17, 39):
            assert lr_at(cfg, t) == pytest.approx(lr_at(plain, t) / (1 + 0.01 * t), rel=1e-12)


# --------------------------------------------------------------------------- resume: pure in t
@pytest.mark.parametrize("cfg", [wc(60, 0.1), wc(23, 0.3, decay=0.002), sgdr(2, 2),
                                 sgdr(3.5, 1), sgdr(4, 3, decay=0.001)], ids=describe_policy)
def test_lr_of_step_t_is_pure_in_t(cfg):
    """Fresh, out of order, after a checkpoint: the lr of step t is the same number."""
    steps = 80
    sequential = policy_lrs(cfg, steps)
    order = list(range(steps))
    random.Random(0).shuffle(order)
    assert {t: lr_at(cfg, t) for t in order} == dict(enumerate(sequential))

    # an uninterrupted scheduler vs one rebuilt from the checkpoint's step count and config
    opt = _opt(1.0)
    sched = PolicyLR(opt, cfg)
    for t in range(steps):
        sched.step(t)
        assert opt.param_groups[0]["lr"] == sequential[t]
    for t in (0, 1, 5, 6, 7, 13, 14, 29, 30, 31, 79):
        saved = json.loads(json.dumps({"policy": cfg.to_dict(), "step": t}))
        opt2 = _opt(123.0)
        resumed = PolicyLR(opt2, PolicyConfig.from_dict(saved["policy"]))
        resumed.step(saved["step"])
        assert opt2.param_groups[0]["lr"] == sequential[t], t
        resumed.step()  # and it carries on from there
        assert opt2.param_groups[0]["lr"] == lr_at(cfg, t + 1)


def test_new_fields_round_trip():
    for cfg in (wc(50, 0.12), sgdr(4, 2)):
        again = PolicyConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and policy_lrs(again, 50) == policy_lrs(cfg, 50)
    assert PolicyConfig().warmup_pct == 0.05 and PolicyConfig().t_mult == 1


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("cfg, message", [
    (PolicyConfig("warmup_cosine", base_lr=0.01, total_steps=10),
     "policy 'warmup_cosine' needs max_lr"),
    (PolicyConfig("warmup_cosine", base_lr=0.01, max_lr=0.1),
     "warmup_cosine needs total_steps >= 1, got None"),
    (PolicyConfig("warmup_cosine", base_lr=0.01, max_lr=0.1, total_steps=0),
     "warmup_cosine needs total_steps >= 1, got 0"),
    (wc(10, 1.0), "warmup_cosine needs warmup_pct in [0, 1), got 1.0"),
    (wc(10, -0.1), "warmup_cosine needs warmup_pct in [0, 1), got -0.1"),
    (wc(10, math.nan), "warmup_cosine needs warmup_pct in [0, 1), got nan"),
    (PolicyConfig("warmup_cosine", base_lr=0.1, max_lr=0.01, total_steps=10),
     "base_lr (0.1) must not exceed max_lr (0.01)"),
    (PolicyConfig("sgdr", base_lr=0.01, step_size=4), "policy 'sgdr' needs max_lr"),
    (PolicyConfig("sgdr", base_lr=0.01, max_lr=0.1),
     "policy 'sgdr' needs step_size (its first period is 2*step_size optimizer steps)"),
    (sgdr(step_size=0.5), "step_size must be >= 1 optimizer step, got 0.5"),
    (sgdr(t_mult=0), "sgdr needs t_mult an integer >= 1 (torch's T_mult), got 0"),
    (sgdr(t_mult=1.5), "sgdr needs t_mult an integer >= 1 (torch's T_mult), got 1.5"),
    (sgdr(cycle_momentum=True), "cycle_momentum needs a CLR policy or one_cycle, not 'sgdr'"),
    (wc(cycle_momentum=True),
     "cycle_momentum needs a CLR policy or one_cycle, not 'warmup_cosine'"),
])
def test_validation_errors_are_one_line_and_name_the_value(cfg, message):
    with pytest.raises(UserError) as info:
        cfg.validate()
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        PolicyLR(_opt(0.1), cfg)


def test_fields_of_other_policies_are_not_checked():
    """Like pct_start for one_cycle: warmup_pct / t_mult only matter to their own policy."""
    PolicyConfig("triangular", base_lr=0.01, max_lr=0.1, step_size=4, warmup_pct=2.0,
                 t_mult=0).validate()
    assert sgdr(2, 2.0).validate().t_mult == 2.0  # an integral float (JSON) is accepted


# --------------------------------------------------------------------------- describe / preview
def test_describe_policy():
    assert describe_policy(wc(100, 0.05)) == (
        "warmup_cosine, base 0.0075, max 0.03, 100 steps, warmup 5 steps (warmup_pct 0.05)")
    assert describe_policy(sgdr(4, 2)) == (
        "sgdr, base 0.0075, max 0.03, period 8 steps (2 x step size 4), t_mult 2")
    assert describe_policy(sgdr(542, 1, decay=0.001)) == (
        "sgdr, base 0.0075, max 0.03, period 1084 steps (2 x step size 542), t_mult 1, "
        "× time decay 0.001")


def test_schedule_command_previews_both(capsys, tmp_path):
    from cxr_ray.cli import main

    assert main(["schedule", "--policy", "sgdr", "--base-lr", "0.0075", "--max-lr", "0.03",
                 "--step-size", "4", "--steps", "40", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lr"] == policy_lrs(sgdr(4), 40)
    assert main(["schedule", "--policy", "warmup_cosine", "--base-lr", "0.0075", "--max-lr",
                 "0.03", "--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "warmup_cosine, base 0.0075, max 0.03, 100 steps, warmup 5 steps" in out
    assert "peaks (lr @ step): 0.03 @ 5" in out
    png = tmp_path / "sgdr.png"
    assert main(["schedule", "--policy", "sgdr", "--base-lr", "0.0075", "--max-lr", "0.03",
                 "--step-size", "10", "--steps", "100", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.03 @ 20, 0.03 @ 40" in capsys.readouterr().out


# --------------------------------------------------------------------------- sweep and trainer
def test_sweep_recipe_accepts_them_in_a_grid():
    from cxr_ray.sweep import plan as sweep, recipe as config

    recipe = config.parse_recipe({
        "experiment": {"name": "x", "shards": "s", "cohorts": ["Mass"]},
        "grid": {"policy": ["triangular", "warmup_cosine", "sgdr"]},
    })
    _, stage2, _ = sweep.plan_trials(recipe)
    assert [s.policy for s in stage2] == ["triangular", "warmup_cosine", "sgdr"]
    assert all(s.run_name.startswith(f"Mass__{s.policy}") for s in stage2)
    assert {s.lr_source for s in stage2} == {"lr_find"}  # bounds from the LR range test
    assert {"warmup_cosine", "sgdr"} <= set(config.BOUNDED_POLICIES)
    assert "warmup_cosine" not in config.DEFAULT_POLICIES  # the demo's grid is unchanged

    paper = config.load_recipe(JOBS / "paper.toml")
    assert paper.grid["policy"][-2:] == ["warmup_cosine", "sgdr"]
    _, stage2, _ = sweep.plan_trials(paper)
    new = [s for s in stage2 if s.policy in ("warmup_cosine", "sgdr")]
    assert {(s.cohort, s.policy) for s in new} == {
        (c, p) for c in paper.cohort_names for p in ("warmup_cosine", "sgdr")}
    assert len(paper.cohort_names) == 15 and {s.lr_source for s in new} == {"lr_find"}

    with pytest.raises(UserError, match=r"unknown policy 'cosine'; valid: .*one_cycle, "
                                        r"warmup_cosine, sgdr"):
        config.parse_recipe({"experiment": {"name": "x", "shards": "s"},
                             "grid": {"policy": ["cosine"]}})


def test_trainer_plans_them_from_the_lr_range_test(local_shards, tmp_path):
    """plan_run: bounds from lr_find.json, warmup_cosine spans the run, sgdr's period from
    step_size_epochs; a re-run with more epochs is the same warmup_cosine run (as one_cycle)."""
    from cxr_ray.train import TrainConfig, plan_run

    bounds = tmp_path / "lr_find.json"
    bounds.write_text(json.dumps({"base_lr": 0.0075, "max_lr": 0.03}))
    common = dict(shards=str(local_shards), cohort="Cardiomegaly", model="mobilenet_v1",
                  width=0.25, pretrained=False, batch_size=16, threads=1,
                  lr_bounds=str(bounds), step_size_epochs=2, epochs=5)

    plan = plan_run(TrainConfig(policy="warmup_cosine", **common))
    spe = plan.steps_per_epoch
    cfg = PolicyConfig.from_dict(plan.policy)
    assert (cfg.name, cfg.base_lr, cfg.max_lr, cfg.total_steps) == (
        "warmup_cosine", 0.0075, 0.03, 5 * spe)
    assert lr_at(cfg, 0) == 0.0075
    longer = plan_run(TrainConfig(policy="warmup_cosine", **{**common, "epochs": 8}))
    assert longer.policy["total_steps"] == 8 * spe and longer.identity() == plan.identity()

    plan = plan_run(TrainConfig(policy="sgdr", **common))
    cfg = PolicyConfig.from_dict(plan.policy)
    assert (cfg.name, cfg.base_lr, cfg.max_lr, cfg.step_size, cfg.t_mult) == (
        "sgdr", 0.0075, 0.03, 2 * spe, 1)
    assert cfg.total_steps is None
    lrs = policy_lrs(cfg, 5 * spe)
    assert [s for s, _ in peaks(lrs)] == [4 * spe]  # one restart: a period is 4 epochs

    with pytest.raises(UserError, match="policy sgdr needs --base-lr and --max-lr"):
        plan_run(TrainConfig(policy="sgdr", **{**common, "lr_bounds": None, "preset": "none"}))


def test_bounds_found_at_another_batch_size_are_rescaled_per_optimizer(local_shards, tmp_path):
    """lr_find.json says the global batch it ran at; a run at another batch scales the bounds
    linearly for SGD and by the square root for Adam and RMSprop."""
    from cxr_ray.train import TrainConfig, plan_run
    from cxr_ray.train.config import batch_scale

    bounds = tmp_path / "lr_find.json"
    bounds.write_text(json.dumps({"base_lr": 0.01, "max_lr": 0.04, "batch_size": 8}))
    common = dict(shards=str(local_shards), cohort="Cardiomegaly", model="mobilenet_v1",
                  width=0.25, pretrained=False, threads=1, policy="triangular",
                  lr_bounds=str(bounds), step_size_epochs=1, epochs=2, preset="none")
    same = plan_run(TrainConfig(batch_size=8, optimizer="sgd", **common)).policy
    assert (same["base_lr"], same["max_lr"]) == (0.01, 0.04)
    sgd = plan_run(TrainConfig(batch_size=16, optimizer="sgd", **common)).policy
    assert (sgd["base_lr"], sgd["max_lr"]) == pytest.approx((0.02, 0.08))
    adam = plan_run(TrainConfig(batch_size=32, optimizer="adam", **common)).policy
    assert (adam["base_lr"], adam["max_lr"]) == pytest.approx((0.02, 0.08))  # sqrt(4) = 2
    assert batch_scale(None, 32, "sgd") == 1.0 and batch_scale(16, 4, "rmsprop") == 0.5
    explicit = plan_run(TrainConfig(batch_size=16, optimizer="sgd", **{**common,
                                                                        "max_lr": 0.05})).policy
    assert explicit["max_lr"] == 0.05 and explicit["base_lr"] == pytest.approx(0.02)
