"""Learning-rate policies of the study (docs/study.md §5–§6), all resumable from a step count.

What this module owns
---------------------
* The maths, as pure functions of the optimizer-step counter ``it``:
  :func:`clr_lr` (the Keras/Smith CLR formula with the four scale modes),
  :func:`time_decay_factor` (Keras ``decay``), :func:`one_cycle_lr` (torch ``OneCycleLR``
  semantics), :func:`warmup_cosine_lr` (linear warmup + cosine, as transformers'
  ``get_cosine_schedule_with_warmup``), :func:`sgdr_lr` (torch
  ``CosineAnnealingWarmRestarts``) and :func:`lr_at` / :func:`momentum_at`, which evaluate a
  whole :class:`PolicyConfig`.
* :class:`PolicyLR`, one ``torch.optim.lr_scheduler.LRScheduler`` subclass that applies any
  policy in closed form. The lr depends on nothing but the config and the step, so a run resumes
  exactly, mid-cycle included, from the step count its checkpoint holds (no lambdas or
  scheduler state to restore, unlike ``LambdaLR`` / ``CyclicLR``).
* :func:`policy_lrs` (a preview, used by ``cxr-ray schedule``).

The step-counter rule (timm style: the training loop owns the counter)
-----------------------------------------------------------------------
``it`` counts optimizer steps, starting at 0.

* Constructing :class:`PolicyLR` sets every param group's lr to the lr for step 0.
* Before every ``optimizer.step()`` the training loop (:mod:`cxr_ray.train.loop`) calls
  ``policy.step(it)`` with its own step counter, which sets the lr of step ``it``; a checkpoint
  holds only that counter. (``step()`` without an index advances by one, for simple loops that
  call it after each ``optimizer.step()``.)
* "The lr in force at step i" (i = 0..N-1) is ``lr_at(config, i)``: what ``cxr-ray schedule
  --json`` prints and what :func:`policy_lrs` returns.

For the CLR family this means: step 0 = ``base_lr``, the peak at step ``step_size``, back at
``base_lr`` at step ``2*step_size`` (one cycle = ``2*step_size`` steps, step size in steps).

Policies (``PolicyConfig.name``)
--------------------------------
``constant``              ``base_lr`` for every step.
``time_decay``            Keras: ``base_lr / (1 + decay*it)``.
``triangular``            CLR, scale 1.
``triangular2``           CLR, amplitude halved every cycle: ``1 / 2**(cycle-1)``.
``exp_range``             CLR, scale ``gamma**it``.
``modified_triangular2``  the study's: ``1 / 2**((cycle-1) % 3)`` (halve for three cycles, then
                          back to full height).
``one_cycle``             Smith's 1cycle with ``torch.optim.lr_scheduler.OneCycleLR`` semantics
                          (cosine) over ``total_steps``: from ``base_lr`` up to ``max_lr`` in the
                          first ``pct_start`` of the steps, then down to ``base_lr /
                          final_div_factor``; held at that value after ``total_steps``.
``warmup_cosine``         modern baseline: linear warmup from ``base_lr`` to ``max_lr`` over the
                          first ``W = round(warmup_pct*total_steps)`` steps, then cosine decay
                          to ``base_lr`` at step ``total_steps`` (transformers'
                          ``get_cosine_schedule_with_warmup`` with a floor); held at ``base_lr``
                          after.
``sgdr``                  modern baseline: cosine annealing with warm restarts (Loshchilov &
                          Hutter 2017; torch ``CosineAnnealingWarmRestarts``) from ``max_lr``
                          down to ``base_lr``; the first period is ``T_0 = 2*step_size`` steps
                          (one CLR cycle), each next one ``t_mult`` times longer.

The bounds keep their CLR meaning for every bounded policy (:data:`BOUNDED_POLICIES`), so the LR
range test feeds all of them alike: ``max_lr`` is the peak, ``base_lr`` the floor and the lr of
step 0 (except ``sgdr``, which starts at its peak like torch's, and ``warmup_cosine`` with
``warmup_pct = 0``). Policies of :data:`TOTAL_STEPS_POLICIES` span the whole run: the trainer
sets ``total_steps`` to ``epochs * steps_per_epoch`` (and a re-run with more epochs resumes
the same run, reshaped). ``sgdr`` needs no run length: its periods come from ``step_size``.

Any policy composes with Keras time decay: a non-zero ``decay`` multiplies the policy's lr by
``1 / (1 + decay*it)`` with the same never-reset counter. That is what Keras does when a CLR
callback sets the lr of ``SGD(decay=...)``: ``lr_t = clr(t) / (1 + decay*t)``, the study's
"SGD with decay + CLR" runs. ``time_decay`` is ``constant`` with a decay.

Momentum is never touched unless ``cycle_momentum=True`` (torch's ``CyclicLR`` cycles it by
default, which would rewrite RMSprop's momentum and Adam's beta1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from cxr_ray.errors import UserError

#: The CLR family: ``clr_lr`` scale modes.
CLR_POLICIES = ("triangular", "triangular2", "exp_range", "modified_triangular2")
#: Modern cosine baselines beside one_cycle (not in the study).
COSINE_POLICIES = ("warmup_cosine", "sgdr")
#: Every policy name :class:`PolicyConfig` accepts.
POLICIES = ("constant", "time_decay", *CLR_POLICIES, "one_cycle", *COSINE_POLICIES)
#: Policies that run between ``base_lr`` and ``max_lr`` (both from the LR range test in a sweep).
BOUNDED_POLICIES = (*CLR_POLICIES, "one_cycle", *COSINE_POLICIES)
#: Policies shaped over the whole run: they need ``total_steps`` (``epochs * steps_per_epoch``).
TOTAL_STEPS_POLICIES = ("one_cycle", "warmup_cosine")


# --------------------------------------------------------------------------- config
@dataclass
class PolicyConfig:
    """One learning-rate policy. Every field is a plain number or string (checkpoint-safe)."""

    name: str = "constant"
    """Policy name, one of :data:`POLICIES`."""
    base_lr: float = 0.01
    """lr at step 0. CLR: the lower bound. constant/time_decay: the lr0. one_cycle: the start.
    warmup_cosine: the warmup's start and the cosine's floor. sgdr: the floor (torch
    ``eta_min``)."""
    max_lr: float | None = None
    """Upper bound (CLR peak, one_cycle peak, warmup_cosine peak, sgdr's lr after each
    restart). Needed by every policy of :data:`BOUNDED_POLICIES`."""
    step_size: float | None = None
    """CLR half cycle, in optimizer steps (the study: 2 epochs' worth). Needed by the CLR family
    and sgdr, whose first period is one CLR cycle, ``2*step_size`` steps."""
    gamma: float = 1.0
    """exp_range: the amplitude is multiplied by ``gamma**it``; in (0, 1]."""
    decay: float = 0.0
    """Keras time decay applied on top of the policy: ``lr * 1/(1 + decay*it)``; 0 = none."""
    total_steps: int | None = None
    """one_cycle, warmup_cosine: the steps the schedule spans (the whole run). Needed by
    :data:`TOTAL_STEPS_POLICIES` only."""
    pct_start: float = 0.3
    """one_cycle: fraction of ``total_steps`` spent rising to ``max_lr`` (torch default 0.3)."""
    final_div_factor: float = 1e4
    """one_cycle: the final lr is ``base_lr / final_div_factor`` (torch default 1e4)."""
    anneal: str = "cos"
    """one_cycle: ``"cos"`` (torch default) or ``"linear"`` interpolation."""
    warmup_pct: float = 0.05
    """warmup_cosine: fraction of ``total_steps`` spent warming up, in [0, 1); the warmup is
    ``round(warmup_pct*total_steps)`` steps (0: plain cosine from ``max_lr``)."""
    t_mult: int = 1
    """sgdr: each period is ``t_mult`` times the previous one; an integer >= 1 (torch's
    ``T_mult``, default 1: every period is ``2*step_size`` steps)."""
    cycle_momentum: bool = False
    """Cycle momentum (SGD/RMSprop ``momentum``, Adam ``beta1``) inversely to the lr. Off by
    default; only for the CLR family and one_cycle (refused for the others)."""
    base_momentum: float = 0.85
    """Momentum at the lr peak when ``cycle_momentum`` (torch default)."""
    max_momentum: float = 0.95
    """Momentum at the lr trough when ``cycle_momentum`` (torch default)."""

    def validate(self) -> "PolicyConfig":
        """Check the fields; raise :class:`UserError` with a one-line reason. Returns self."""
        if self.name not in POLICIES:
            raise UserError(f"unknown lr policy {self.name!r}; valid: {', '.join(POLICIES)}")
        if not _finite(self.base_lr) or self.base_lr < 0:
            raise UserError(f"base_lr must be a finite number >= 0, got {self.base_lr}")
        if self.max_lr is not None:
            if not _finite(self.max_lr) or self.max_lr <= 0:
                raise UserError(f"max_lr must be a finite number > 0, got {self.max_lr}")
            if self.base_lr > self.max_lr:
                raise UserError(f"base_lr ({self.base_lr:g}) must not exceed max_lr "
                                f"({self.max_lr:g})")
        if self.step_size is not None and not (_finite(self.step_size) and self.step_size >= 1):
            raise UserError(f"step_size must be >= 1 optimizer step, got {self.step_size}")
        if not _finite(self.decay) or self.decay < 0:
            raise UserError(f"decay must be >= 0, got {self.decay}")
        if self.name in BOUNDED_POLICIES:
            if self.max_lr is None:
                raise UserError(f"policy {self.name!r} needs max_lr")
        if self.name in CLR_POLICIES and self.step_size is None:
            raise UserError(f"policy {self.name!r} needs step_size (optimizer steps per half "
                            "cycle)")
        if self.name == "sgdr" and self.step_size is None:
            raise UserError("policy 'sgdr' needs step_size (its first period is 2*step_size "
                            "optimizer steps)")
        if self.name == "exp_range" and not (0 < self.gamma <= 1):
            raise UserError(f"exp_range needs gamma in (0, 1], got {self.gamma}")
        if self.name == "one_cycle":
            if self.total_steps is None or int(self.total_steps) < 1:
                raise UserError(f"one_cycle needs total_steps >= 1, got {self.total_steps}")
            if not (0 < self.pct_start < 1):
                raise UserError(f"one_cycle needs pct_start in (0, 1), got {self.pct_start}")
            if self.final_div_factor <= 0:
                raise UserError(f"final_div_factor must be > 0, got {self.final_div_factor}")
            if self.anneal not in ("cos", "linear"):
                raise UserError(f"anneal must be 'cos' or 'linear', got {self.anneal!r}")
        if self.name == "warmup_cosine":
            if self.total_steps is None or int(self.total_steps) < 1:
                raise UserError(f"warmup_cosine needs total_steps >= 1, got {self.total_steps}")
            if not (_finite(self.warmup_pct) and 0 <= self.warmup_pct < 1):
                raise UserError(f"warmup_cosine needs warmup_pct in [0, 1), got "
                                f"{self.warmup_pct}")
        if self.name == "sgdr" and not (_finite(self.t_mult) and self.t_mult >= 1
                                        and float(self.t_mult).is_integer()):
            raise UserError(f"sgdr needs t_mult an integer >= 1 (torch's T_mult), got "
                            f"{self.t_mult}")
        if self.cycle_momentum:
            if self.name not in CLR_POLICIES and self.name != "one_cycle":
                raise UserError(f"cycle_momentum needs a CLR policy or one_cycle, not "
                                f"{self.name!r}")
            if not (0 <= self.base_momentum <= self.max_momentum < 1):
                raise UserError("cycle_momentum needs 0 <= base_momentum <= max_momentum < 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for JSON, TOML, checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PolicyConfig":
        """Inverse of :meth:`to_dict`; unknown keys are a :class:`UserError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown lr policy field(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------- pure maths
def clr_scale(scale_mode: str, cycle: int, it: int, gamma: float = 1.0) -> float:
    """Amplitude scale of the CLR family for 1-based ``cycle`` and step ``it``."""
    if scale_mode == "triangular":
        return 1.0
    if scale_mode == "triangular2":
        return 1.0 / (2.0 ** (cycle - 1))
    if scale_mode == "modified_triangular2":
        return 1.0 / (2.0 ** ((cycle - 1) % 3))
    if scale_mode == "exp_range":
        return gamma ** it
    raise ValueError(f"unknown CLR scale mode {scale_mode!r}; valid: {', '.join(CLR_POLICIES)}")


def clr_cycle_position(it: int, step_size: float) -> tuple[int, float]:
    """``(cycle, height)`` of step ``it``: the 1-based cycle and the triangle height in [0, 1]
    (0 at the base, 1 at the peak), exactly as in Keras' CLR callback::

        cycle = floor(1 + it / (2*step_size));  x = |it/step_size - 2*cycle + 1|
        height = max(0, 1 - x)
    """
    cycle = math.floor(1 + it / (2 * step_size))
    x = abs(it / step_size - 2 * cycle + 1)
    return cycle, max(0.0, 1.0 - x)


def clr_lr(it: int, base_lr: float, max_lr: float, step_size: float,
           scale_mode: str = "triangular", gamma: float = 1.0) -> float:
    """The CLR lr in force at optimizer step ``it`` (docs/study.md §6; Smith 2017; Keras ``CyclicLR``).

    ``lr = base_lr + (max_lr - base_lr) * max(0, 1 - x) * scale``; step 0 is ``base_lr``, the
    peak is at ``step_size``, the base again at ``2*step_size``.
    """
    cycle, height = clr_cycle_position(it, step_size)
    return base_lr + (max_lr - base_lr) * height * clr_scale(scale_mode, cycle, it, gamma)


def time_decay_factor(it: int, decay: float) -> float:
    """Keras time-based decay factor ``1 / (1 + decay*it)`` (``it`` = optimizer steps)."""
    return 1.0 / (1.0 + decay * it)


def _anneal(start: float, end: float, pct: float, how: str) -> float:
    if how == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _one_cycle_phase(it: int, total_steps: int, pct_start: float) -> tuple[int, float]:
    """``(phase, pct)``: phase 0 rises, phase 1 falls; torch ``OneCycleLR`` boundaries
    (the peak at step ``pct_start*total_steps - 1``). Steps past the end are held at the end."""
    it = min(it, total_steps - 1)
    up_end = float(pct_start * total_steps) - 1
    if it <= up_end:
        return 0, it / up_end if up_end > 0 else 1.0
    down_len = (total_steps - 1) - up_end
    return 1, (it - up_end) / down_len if down_len > 0 else 1.0


def one_cycle_lr(it: int, total_steps: int, base_lr: float, max_lr: float,
                 pct_start: float = 0.3, final_div_factor: float = 1e4,
                 anneal: str = "cos") -> float:
    """1cycle lr at step ``it`` with torch ``OneCycleLR`` semantics: ``base_lr`` (torch's
    ``max_lr/div_factor``) → ``max_lr`` → ``base_lr/final_div_factor``; held after the end."""
    phase, pct = _one_cycle_phase(it, total_steps, pct_start)
    if phase == 0:
        return _anneal(base_lr, max_lr, pct, anneal)
    return _anneal(max_lr, base_lr / final_div_factor, pct, anneal)


def warmup_steps(total_steps: int, warmup_pct: float) -> int:
    """warmup_cosine's warmup length ``W = round(warmup_pct * total_steps)`` in steps."""
    return int(round(warmup_pct * total_steps))


def warmup_cosine_lr(it: int, total_steps: int, base_lr: float, max_lr: float,
                     warmup_pct: float = 0.05) -> float:
    """Linear warmup + cosine decay at step ``it``; ``T = total_steps``,
    ``W = round(warmup_pct*T)``::

        it <  W:  lr = base_lr + (max_lr - base_lr) * it / W
        it >= W:  p  = min(1, (it - W) / max(1, T - W))
                  lr = base_lr + (max_lr - base_lr) * (1 + cos(pi*p)) / 2

    ``(lr - base_lr) / (max_lr - base_lr)`` is exactly transformers'
    ``get_cosine_schedule_with_warmup(num_warmup_steps=W, num_training_steps=T)`` multiplier
    (and torch's ``LinearLR`` + ``CosineAnnealingLR(T_max=T-W, eta_min=base_lr)`` in a
    ``SequentialLR``): step 0 is ``base_lr``, the peak ``max_lr`` is at step ``W``, the floor
    ``base_lr`` at step ``T`` (one past the run's last step); steps past ``T`` stay there.
    """
    w = warmup_steps(total_steps, warmup_pct)
    if it < w:
        return base_lr + (max_lr - base_lr) * it / w
    p = min(1.0, (it - w) / max(1, total_steps - w))
    return base_lr + (max_lr - base_lr) * (1.0 + math.cos(math.pi * p)) / 2.0


def sgdr_period(it: int, t_0: float, t_mult: int = 1) -> tuple[float, float]:
    """``(t_cur, t_i)`` of step ``it`` under warm restarts: the steps since the last restart and
    the length of the current period. Periods are ``t_0, t_0*t_mult, t_0*t_mult**2, ...``;
    restarts at ``t_0 * (t_mult**n - 1) / (t_mult - 1)`` (``n*t_0`` when ``t_mult == 1``)."""
    if t_mult == 1:
        n = math.floor(it / t_0)
        return it - n * t_0, t_0
    start, length = 0.0, float(t_0)
    while it >= start + length:  # exact: no float log at a period boundary (O(log it) loops)
        start += length
        length *= t_mult
    return it - start, length


def sgdr_lr(it: int, base_lr: float, max_lr: float, t_0: float, t_mult: int = 1) -> float:
    """SGDR at step ``it`` (Loshchilov & Hutter 2017; torch ``CosineAnnealingWarmRestarts`` with
    the optimizer's lr = ``max_lr`` and ``eta_min = base_lr``)::

        lr = base_lr + (max_lr - base_lr) * (1 + cos(pi * t_cur / t_i)) / 2

    with ``(t_cur, t_i) = sgdr_period(it, t_0, t_mult)``: ``max_lr`` at step 0 and at every
    restart, falling towards ``base_lr`` within each period."""
    t_cur, t_i = sgdr_period(it, t_0, t_mult)
    return base_lr + (max_lr - base_lr) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0


def lr_at(config: PolicyConfig, it: int) -> float:
    """The lr in force at optimizer step ``it`` under ``config`` (pure; ``it`` >= 0)."""
    c = config
    if c.name in ("constant", "time_decay"):
        lr = c.base_lr
    elif c.name in CLR_POLICIES:
        assert c.max_lr is not None and c.step_size is not None, "validate() the config first"
        lr = clr_lr(it, c.base_lr, c.max_lr, c.step_size, c.name, c.gamma)
    elif c.name == "one_cycle":
        assert c.max_lr is not None and c.total_steps is not None, "validate() the config first"
        lr = one_cycle_lr(it, int(c.total_steps), c.base_lr, c.max_lr, c.pct_start,
                          c.final_div_factor, c.anneal)
    elif c.name == "warmup_cosine":
        assert c.max_lr is not None and c.total_steps is not None, "validate() the config first"
        lr = warmup_cosine_lr(it, int(c.total_steps), c.base_lr, c.max_lr, c.warmup_pct)
    elif c.name == "sgdr":
        assert c.max_lr is not None and c.step_size is not None, "validate() the config first"
        lr = sgdr_lr(it, c.base_lr, c.max_lr, 2 * c.step_size, int(c.t_mult))
    else:
        raise ValueError(f"unknown lr policy {c.name!r}")
    if c.decay:
        lr *= time_decay_factor(it, c.decay)
    return lr


def momentum_at(config: PolicyConfig, it: int) -> float | None:
    """Momentum for step ``it`` when ``config.cycle_momentum``, else ``None`` (leave it alone).

    CLR: ``max_momentum - (max_momentum - base_momentum) * height * scale`` (torch ``CyclicLR``);
    one_cycle: ``max → base`` while the lr rises, ``base → max`` while it falls (``OneCycleLR``).
    """
    c = config
    if not c.cycle_momentum:
        return None
    if c.name in CLR_POLICIES:
        assert c.step_size is not None
        cycle, height = clr_cycle_position(it, c.step_size)
        scale = clr_scale(c.name, cycle, it, c.gamma)
        return c.max_momentum - (c.max_momentum - c.base_momentum) * height * scale
    if c.name == "one_cycle":
        assert c.total_steps is not None
        phase, pct = _one_cycle_phase(it, int(c.total_steps), c.pct_start)
        if phase == 0:
            return _anneal(c.max_momentum, c.base_momentum, pct, c.anneal)
        return _anneal(c.base_momentum, c.max_momentum, pct, c.anneal)
    return None


def policy_lrs(config: PolicyConfig, steps: int) -> list[float]:
    """The lr in force at steps ``0 .. steps-1`` (a preview; what ``cxr-ray schedule`` prints)."""
    config.validate()
    return [lr_at(config, i) for i in range(steps)]


# --------------------------------------------------------------------------- scheduler
class PolicyLR(LRScheduler):
    """Applies a :class:`PolicyConfig` to an optimizer, in closed form, once per optimizer step.

    Step-counter rule: the loop owns the step. Construction sets the lr of step 0; ``step(it)``
    sets the lr of step ``it`` (the training loop calls it with its counter before every
    optimizer step); ``step()`` advances by one. ``last_epoch`` is the index of the step whose
    lr is in force.

    Param groups: every group gets ``lr_at(config, it) * group.get("lr_scale", 1.0)``, so a
    group can run at a fixed fraction of the policy (e.g. a backbone at 0.1x).

    Resume: no scheduler state is saved; a fresh ``PolicyLR`` on the restored optimizer, stepped
    with the saved step count, continues exactly where the saved run was.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: PolicyConfig) -> None:
        self.config = config.validate()
        if config.cycle_momentum:
            defaults = optimizer.defaults
            if "momentum" not in defaults and "betas" not in defaults:
                raise UserError(f"cycle_momentum: {type(optimizer).__name__} has neither "
                                "momentum nor betas")
        super().__init__(optimizer, last_epoch=-1)  # its _initial_step() applies step 0

    def get_lr(self) -> list[float]:
        """lrs for step ``self.last_epoch``, one per param group."""
        lr = lr_at(self.config, self.last_epoch)
        return [lr * float(g.get("lr_scale", 1.0)) for g in self.optimizer.param_groups]

    def step(self, it: int | None = None) -> None:  # type: ignore[override]
        """Advance to the next optimizer step (or jump to step ``it``) and set its lr."""
        self._step_count = getattr(self, "_step_count", 0) + 1
        self.last_epoch = self.last_epoch + 1 if it is None else int(it)
        if self.last_epoch < 0:
            raise ValueError(f"step index must be >= 0, got {self.last_epoch}")
        self._apply()

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        momentum = momentum_at(self.config, self.last_epoch)
        if momentum is not None:
            for group in self.optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]


# --------------------------------------------------------------------------- preview
def peaks(lrs: list[float]) -> list[tuple[int, float]]:
    """``(step, lr)`` of every interior local maximum of a previewed schedule (a rise, then no
    rise; the last step is not a peak, it may be cut mid-rise)."""
    out = []
    for i in range(1, len(lrs) - 1):
        if lrs[i] > lrs[i - 1] and lrs[i] >= lrs[i + 1]:
            out.append((i, lrs[i]))
    return out


def describe_policy(config: PolicyConfig) -> str:
    """One line naming the policy and its numbers (plot titles, logs)."""
    c = config
    parts = [c.name, f"base {c.base_lr:g}"]
    if c.max_lr is not None and c.name not in ("constant", "time_decay"):
        parts.append(f"max {c.max_lr:g}")
    if c.name in CLR_POLICIES and c.step_size is not None:
        parts.append(f"step size {c.step_size:g}")
    if c.name == "exp_range":
        parts.append(f"gamma {c.gamma:g}")
    if c.name == "one_cycle" and c.total_steps is not None:
        parts.append(f"{c.total_steps} steps, pct_start {c.pct_start:g}")
    if c.name == "warmup_cosine" and c.total_steps is not None:
        warmup = warmup_steps(int(c.total_steps), c.warmup_pct)
        parts.append(f"{c.total_steps} steps, warmup {warmup} steps (warmup_pct "
                     f"{c.warmup_pct:g})")
    if c.name == "sgdr" and c.step_size is not None:
        parts.append(f"period {2 * c.step_size:g} steps (2 x step size {c.step_size:g}), "
                     f"t_mult {c.t_mult:g}")
    if c.decay:
        parts.append(f"× time decay {c.decay:g}")
    return ", ".join(parts)


def plot_schedule(lrs: list[float], path: str | Path, *, title: str = "",
                  steps_per_epoch: int | None = None) -> Path:
    """Draw a previewed schedule (lr vs optimizer step, or vs epoch) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = range(len(lrs))
    if steps_per_epoch:
        ax.plot([s / steps_per_epoch for s in steps], lrs, lw=1.2)
        ax.set_xlabel(f"epoch ({steps_per_epoch} optimizer steps each)")
    else:
        ax.plot(list(steps), lrs, lw=1.2, marker="." if len(lrs) <= 100 else None)
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
