"""Learning-rate policies of the study (docs/study.md §5–§6), all resumable from a step count.

What this module owns
---------------------
* The maths, as pure functions of the optimizer-step counter ``it``:
  :func:`clr_lr` (the Keras/Smith CLR formula with the four scale modes),
  :func:`time_decay_factor` (Keras ``decay``), :func:`one_cycle_lr` (torch ``OneCycleLR``
  semantics) and :func:`lr_at` / :func:`momentum_at`, which evaluate a whole
  :class:`PolicyConfig`.
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
#: Every policy name :class:`PolicyConfig` accepts.
POLICIES = ("constant", "time_decay", *CLR_POLICIES, "one_cycle")


# --------------------------------------------------------------------------- config
@dataclass
class PolicyConfig:
    """One learning-rate policy. Every field is a plain number or string (checkpoint-safe)."""

    name: str = "constant"
    """Policy name, one of :data:`POLICIES`."""
    base_lr: float = 0.01
    """lr at step 0. CLR: the lower bound. constant/time_decay: the lr0. one_cycle: the start."""
    max_lr: float | None = None
    """Upper bound (CLR peak, one_cycle peak). Needed by the CLR family and one_cycle."""
    step_size: float | None = None
    """CLR half cycle, in optimizer steps (the study: 2 epochs' worth). Needed by the CLR family."""
    gamma: float = 1.0
    """exp_range: the amplitude is multiplied by ``gamma**it``; in (0, 1]."""
    decay: float = 0.0
    """Keras time decay applied on top of the policy: ``lr * 1/(1 + decay*it)``; 0 = none."""
    total_steps: int | None = None
    """one_cycle: the steps the cycle spans (the whole run). Needed by one_cycle only."""
    pct_start: float = 0.3
    """one_cycle: fraction of ``total_steps`` spent rising to ``max_lr`` (torch default 0.3)."""
    final_div_factor: float = 1e4
    """one_cycle: the final lr is ``base_lr / final_div_factor`` (torch default 1e4)."""
    anneal: str = "cos"
    """one_cycle: ``"cos"`` (torch default) or ``"linear"`` interpolation."""
    cycle_momentum: bool = False
    """Cycle momentum (SGD/RMSprop ``momentum``, Adam ``beta1``) inversely to the lr. Off by
    default; only meaningful for the CLR family and one_cycle."""
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
        if self.name in CLR_POLICIES or self.name == "one_cycle":
            if self.max_lr is None:
                raise UserError(f"policy {self.name!r} needs max_lr")
        if self.name in CLR_POLICIES and self.step_size is None:
            raise UserError(f"policy {self.name!r} needs step_size (optimizer steps per half "
                            "cycle)")
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
        if self.cycle_momentum:
            if self.name not in CLR_POLICIES and self.name != "one_cycle":
                raise UserError(f"cycle_momentum needs a cyclical policy, not {self.name!r}")
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
