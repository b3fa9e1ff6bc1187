"""The LR range test ("LR finder", docs/study.md §7; Smith 2017; the study's §A6).

Train for a while with the lr growing exponentially every optimizer step from ``min_lr`` to
``max_lr``, record the loss, stop when it diverges, smooth the curve and read bounds for a
cyclical policy off it.

This module holds the pieces; the range test itself runs in
:func:`cxr_ray.train.lr_find.range_test`, in the process or Ray Train fit that trained the model
(the trained run is left untouched):

* :class:`LrRangeTest` — one ramp and its bookkeeping: ``lr_at(i)`` gives the lr of step ``i``;
  after the step, ``record(i, loss)`` stores the (globally averaged) loss and answers "stop?".
  The loop owns the step counter, as for every lr policy (:mod:`cxr_ray.optim.schedules`).
* :func:`analyse` — a pure function of one recorded curve: the smoothed curve, every rule's
  suggestion, and what is wrong with the curve, if anything.
* :func:`combine` — the curves of ``repeats`` ramps from the same start (different batch
  orders): the median suggestion of every rule with its spread, the chosen bounds, the problems.
* :class:`LrRangeResult` — all of it (``to_dict()``, ``plot(path)``).

**Scale with the ramp.** Everything that looks along the curve is measured as a fraction of the
ramp, not in points, so that a 30-step and a 300-step ramp over the same lr range read the
same stretch of log(lr):

* smoothing: a zero-phase Gaussian over log(loss) against the step index (equivalently log lr,
  which the ramp spaces evenly), of standard deviation ``window`` × ``num_steps`` points (at
  least one point). Zero-phase: the smoothed curve does not lag the raw one, unlike fastai's
  running average (β = 0.98 averages over the last ~50 points: a sixth of a 300-step ramp, or
  more than a whole 30-step one), whose lag moved the paper rule 4.8× between 30 and 300
  steps on the embedded data. On log(loss) so a diverging tail does not drag the points before
  it up.
* the divergence stop watches a causal running average with the same window (it has to decide
  while the ramp runs; the lag only delays the stop).
* the rules ignore the first ``skip_start`` and the last ``skip_end`` fractions of the ramp.

**Rules** (every rule gives ``max_lr``; ``base_lr = base_fraction × max_lr``, the study: ¼):

``paper``     the study's: the lr at the minimum of the smoothed loss.
``steepest``  the lr where the smoothed loss falls fastest against log(lr), before the minimum.
              It sits where the ramp's accumulated lr first reaches the scale of 1/curvature,
              so it moves with the ramp's length by nature (about ∝ 1/num_steps).
``valley``    fastai's: the longest descending stretch of the smoothed loss (the longest
              decreasing subsequence) and the point about 2/3 of the way down it.

**Problems** a curve or a set of repeats can have (each makes the bounds untrustworthy; the
sweep then falls back to bounds its recipe names, see ``fallback``):

``flat``          the smoothed loss falls by less than ``min_descent`` (relative) from the start
                  of the read stretch to its minimum: nothing to read (e.g. a saturated model).
``no turn``       the minimum is at the end of a ramp that never diverged: the bounds lie at or
                  beyond ``max_lr`` of the ramp.
``disagree``      the repeats' ``max_lr`` differ by more than ``spread_tolerance`` (max / min).

**Known answers.** On full-batch least squares, plain gradient descent is stable below 2/λmax
and heavy-ball momentum β below 2(1+β)/λmax (λmax: the Hessian's largest eigenvalue). A gradient
step below 2/λmax never raises a quadratic's loss, so ``paper`` lands at or just past that
threshold for gradient descent (the loss only turns once a direction is unstable) and ``base_lr``
below it; with momentum the loss starts to oscillate well before, and ``paper`` lands below.
``tests/unit/test_lr_finder.py`` checks all rules against those thresholds for 30-, 100- and
300-step ramps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_ray.errors import UserError

#: Suggestion rules :func:`suggest` knows.
RULES = ("paper", "steepest", "valley")
#: What the test measures after each step: the training batch's loss, or held-out batches'.
LOSS_MODES = ("train", "val")
#: Where the sweep takes bounds from when the test's curve cannot be trusted.
FALLBACKS = ("stage1", "paper", "measured", "error")


@dataclass
class LrRangeConfig:
    """One LR range test."""

    min_lr: float = 1e-7
    """lr of the first step (the study: 1e-7)."""
    max_lr: float = 1.0
    """lr of the last step (the study: 1)."""
    num_steps: int = 100
    """Optimizer steps of the ramp (the study: 1–5 epochs' worth)."""
    window: float = 0.04
    """Smoothing: standard deviation of the Gaussian over log(loss), as a fraction of the ramp
    (0.04 of a ramp over 5 decades: 0.2 decades, whatever the number of steps); 0 = none."""
    smoothing: float | None = None
    """Running-average factor of the divergence stop; None: from ``window`` (the same span)."""
    diverge_factor: float = 4.0
    """Stop once the running-average loss exceeds this multiple of its best value so far."""
    rule: str = "paper"
    """Suggestion rule for the returned ``(base_lr, max_lr)``: one of :data:`RULES`."""
    base_fraction: float = 0.25
    """``base_lr = base_fraction * max_lr`` (the study: one fourth)."""
    skip_start: float = 0.1
    """Fraction of the ramp at its start the rules do not read (fastai: 10 %)."""
    skip_end: float = 0.0
    """Fraction of the ramp at its end the rules do not read (the divergence stop and the
    zero-phase smoothing already keep the diverging tail out)."""
    repeats: int = 1
    """Ramps from the same start, each with its own batch order; the bounds are the median."""
    loss: str = "train"
    """``train``: the loss of each step's training batch (fastai, the study); ``val``: after
    each step, the loss on ``val_batches`` fixed held-out batches (Smith's original test)."""
    val_batches: int = 4
    """Held-out batches the ``val`` mode evaluates after every step."""
    min_descent: float = 0.05
    """A curve whose smoothed loss falls by less than this fraction is ``flat``."""
    spread_tolerance: float = 3.0
    """Repeats whose ``max_lr`` differ by more than this factor (max / min) ``disagree``."""
    fallback: str = "measured"
    """When the curve has a problem: ``measured`` (keep the measured bounds, flagged),
    ``stage1`` (the lr the start model was trained with × [base_fraction, 1]), ``paper`` (the
    study's Table 8 bounds where the model and resolution are the study's, else ``stage1``)
    or ``error``. Sweeps default to ``stage1`` (``[lr_find] fallback``)."""

    def validate(self) -> "LrRangeConfig":
        """Raise :class:`UserError` for nonsensical settings; returns self."""
        if not (0 < self.min_lr < self.max_lr) or not math.isfinite(self.max_lr):
            raise UserError(f"LR range test needs 0 < min_lr < max_lr, got {self.min_lr:g}, "
                            f"{self.max_lr:g}")
        if self.num_steps < 2:
            raise UserError(f"LR range test needs num_steps >= 2, got {self.num_steps}")
        if not 0 <= self.window < 0.5:
            raise UserError(f"window must be in [0, 0.5) of the ramp, got {self.window}")
        if self.smoothing is not None and not 0 <= self.smoothing < 1:
            raise UserError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.diverge_factor <= 1:
            raise UserError(f"diverge_factor must be > 1, got {self.diverge_factor}")
        if self.rule not in RULES:
            raise UserError(f"unknown suggestion rule {self.rule!r}; valid: {', '.join(RULES)}")
        if not 0 < self.base_fraction <= 1:
            raise UserError(f"base_fraction must be in (0, 1], got {self.base_fraction}")
        if not (0 <= self.skip_start < 1 and 0 <= self.skip_end < 1
                and self.skip_start + self.skip_end < 0.9):
            raise UserError("skip_start and skip_end are fractions of the ramp that must leave "
                            f"at least 10 % of it; got {self.skip_start}, {self.skip_end}")
        if self.repeats < 1:
            raise UserError(f"repeats must be >= 1, got {self.repeats}")
        if self.loss not in LOSS_MODES:
            raise UserError(f"loss must be one of {', '.join(LOSS_MODES)}, got {self.loss!r}")
        if self.val_batches < 1:
            raise UserError(f"val_batches must be >= 1, got {self.val_batches}")
        if not 0 <= self.min_descent < 1 or self.spread_tolerance < 1:
            raise UserError("need 0 <= min_descent < 1 and spread_tolerance >= 1, got "
                            f"{self.min_descent}, {self.spread_tolerance}")
        if self.fallback not in FALLBACKS:
            raise UserError(f"fallback must be one of {', '.join(FALLBACKS)}, got "
                            f"{self.fallback!r}")
        return self

    @property
    def sigma(self) -> float:
        """Smoothing standard deviation in points of this ramp."""
        return self.window * self.num_steps

    @property
    def beta(self) -> float:
        """Running-average factor of the divergence stop."""
        if self.smoothing is not None:
            return self.smoothing
        return 0.0 if self.sigma <= 0.5 else math.exp(-1.0 / self.sigma)


# --------------------------------------------------------------------------- one ramp
class LrRangeTest:
    """The exponential ramp and the loss record of one LR range test.

    Loop contract (the loop owns the counter ``i = 0, 1, ...``)::

        for i in range(test.num_steps):
            set every param group's lr to test.lr_at(i); train one step; loss = ...
            if test.record(i, loss): break
    """

    def __init__(self, config: LrRangeConfig | None = None) -> None:
        self.config = (config or LrRangeConfig()).validate()
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.running: list[float] = []
        self.best = math.inf
        self.stop_reason = ""
        self._avg = 0.0

    @property
    def num_steps(self) -> int:
        """Steps in the full ramp."""
        return self.config.num_steps

    def lr_at(self, i: int) -> float:
        """``min_lr * (max_lr/min_lr) ** (i / (num_steps-1))``: min at step 0, max at the end."""
        c = self.config
        return c.min_lr * (c.max_lr / c.min_lr) ** (i / (c.num_steps - 1))

    def record(self, i: int, loss: float) -> bool:
        """Store the loss of step ``i``; True when the test should stop (diverged or done)."""
        loss = float(loss)
        if not math.isfinite(loss):
            self.stop_reason = f"non-finite loss at step {i} (lr {self.lr_at(i):.3g})"
            return True
        beta = self.config.beta
        self._avg = beta * self._avg + (1 - beta) * loss
        avg = self._avg / (1 - beta ** (len(self.losses) + 1))
        self.lrs.append(self.lr_at(i))
        self.losses.append(loss)
        self.running.append(avg)
        self.best = min(self.best, avg)
        if avg > self.config.diverge_factor * self.best:
            self.stop_reason = (f"diverged at step {i} (lr {self.lr_at(i):.3g}): running-average "
                                f"loss {avg:.4g} > {self.config.diverge_factor:g} x best "
                                f"{self.best:.4g}")
            return True
        if i >= self.config.num_steps - 1:
            self.stop_reason = "reached max_lr"
            return True
        return False

    def curve(self, repeat: int = 0) -> "LrRangeCurve":
        """The recorded ramp, analysed (:func:`analyse`)."""
        return analyse(self.lrs, self.losses, self.config, stop_reason=self.stop_reason,
                       repeat=repeat)

    def result(self) -> "LrRangeResult":
        """One ramp's result (``repeats`` ramps: :func:`combine` their curves)."""
        return combine([self.curve()], self.config)


# --------------------------------------------------------------------------- analysis
def smooth(losses: Sequence[float], sigma: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing of log(loss) over the point index, standard deviation
    ``sigma`` points (the weights renormalised at the ends); returned as a loss. Losses <= 0
    (a perfect fit) are floored at 1e-12 before the log."""
    y = np.log(np.maximum(np.asarray(losses, float), 1e-12))
    if sigma <= 0.5 or len(y) < 2:
        return np.exp(y)
    i = np.arange(len(y))
    w = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return np.exp(w @ y / w.sum(axis=1))


def read_range(n_points: int, config: LrRangeConfig) -> tuple[int, int]:
    """``[lo, hi)``: the points the rules read (``skip_start``/``skip_end`` of the planned ramp,
    at least 3 points when the curve has them)."""
    lo = int(config.skip_start * config.num_steps)
    hi = min(n_points, config.num_steps - int(config.skip_end * config.num_steps))
    if hi - lo < 3:
        lo, hi = max(0, min(lo, n_points - 3)), n_points
    return lo, hi


@dataclass
class LrRangeCurve:
    """One ramp: the recorded curve, its smoothed version, what each rule reads off it."""

    lrs: list[float]
    """lr of each recorded step."""
    losses: list[float]
    """Loss measured at each step (training batch, or held-out batches in ``val`` mode)."""
    smoothed: list[float]
    """Zero-phase smoothed loss (:func:`smooth`)."""
    suggestions: dict[str, float]
    """``max_lr`` suggested by every rule in :data:`RULES`."""
    problems: list[str] = field(default_factory=list)
    """What makes this curve's bounds untrustworthy (``flat: ...``, ``no turn: ...``)."""
    stop_reason: str = ""
    """Why the ramp stopped."""
    repeat: int = 0
    """Which repeat (its batch order)."""

    @property
    def stopped_early(self) -> bool:
        return not self.stop_reason.startswith("reached")


def analyse(lrs: Sequence[float], losses: Sequence[float], config: LrRangeConfig, *,
            stop_reason: str = "", repeat: int = 0) -> LrRangeCurve:
    """Smooth one recorded ramp, apply every rule to its read range, name its problems."""
    if len(losses) < 3:
        raise UserError(f"LR range test recorded only {len(losses)} step(s) "
                        f"({stop_reason or 'no data'}); lower min_lr or give more batches")
    x = np.asarray(lrs, float)
    sm = smooth(losses, config.sigma)
    lo, hi = read_range(len(x), config)
    xs, ys = x[lo:hi], sm[lo:hi]
    suggestions = {rule: suggest(xs, ys, rule) for rule in RULES}
    problems = []
    at_min = int(np.argmin(ys))
    drop = 1.0 - ys[at_min] / ys[0]
    if drop < config.min_descent:
        problems.append(f"flat: the smoothed loss falls {100 * max(drop, 0):.1f} % from lr "
                        f"{xs[0]:.3g} to its minimum (at least {100 * config.min_descent:g} % "
                        "needed)")
    elif stop_reason.startswith("reached") and at_min >= len(ys) - max(2, int(config.sigma)):
        problems.append(f"no turn: the loss still falls at the ramp's end (lr {xs[-1]:.3g}); "
                        "raise max_lr of the ramp")
    return LrRangeCurve(lrs=[float(v) for v in x], losses=[float(v) for v in losses],
                        smoothed=[float(v) for v in sm], suggestions=suggestions,
                        problems=problems, stop_reason=stop_reason, repeat=repeat)


def suggest(lrs: Iterable[float], smoothed: Iterable[float], rule: str = "paper") -> float:
    """``max_lr`` suggested by ``rule`` for a (smoothed) loss-vs-lr curve; see the module doc."""
    x = np.asarray(list(lrs), float)
    y = np.asarray(list(smoothed), float)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("suggest needs two equally long curves of at least 2 points")
    if rule == "paper":
        return float(x[int(np.argmin(y))])
    if rule == "steepest":
        end = max(2, int(np.argmin(y)) + 1)  # the fall before the minimum
        slope = np.diff(y[:end]) / np.diff(np.log(x[:end]))
        return float(x[int(np.argmin(slope))])
    if rule == "valley":
        return float(x[valley_index(y)])
    raise UserError(f"unknown suggestion rule {rule!r}; valid: {', '.join(RULES)}")


def valley_index(losses: np.ndarray) -> int:
    """fastai's valley: the longest decreasing subsequence of ``losses`` ends at ``end`` with
    length ``L``; the suggestion is ``start + int(L/3) + int(L/6)`` (about 2/3 down, where
    ``start = end - L``)."""
    y = np.asarray(losses, float)
    n = len(y)
    lds = np.ones(n, dtype=int)
    for i in range(1, n):
        higher = y[:i] > y[i]
        if higher.any():
            lds[i] = lds[:i][higher].max() + 1
    end = int(np.argmax(lds))  # the first index of the longest run, as fastai's loop keeps
    start = end - int(lds[end])
    sections = (end - start) / 3
    return max(0, min(n - 1, start + int(sections) + int(sections / 2)))


def combine(curves: Sequence[LrRangeCurve], config: LrRangeConfig) -> "LrRangeResult":
    """The repeats' curves → the median suggestion of every rule (geometric: the middle one
    for an odd count), its spread (min, max), and the chosen bounds with every problem."""
    if not curves:
        raise UserError("LR range test: no curve recorded")
    suggestions, spread = {}, {}
    for rule in RULES:
        vals = np.array([c.suggestions[rule] for c in curves])
        suggestions[rule] = float(np.exp(np.median(np.log(vals))))
        spread[rule] = [float(vals.min()), float(vals.max())]
    problems = [f"repeat {c.repeat}: {p}" if len(curves) > 1 else p
                for c in curves for p in c.problems]
    lo, hi = spread[config.rule]
    if len(curves) > 1 and hi / lo > config.spread_tolerance:
        problems.append(f"disagree: the repeats' max_lr ({config.rule} rule) spans {lo:.3g} to "
                        f"{hi:.3g}, {hi / lo:.1f}x (tolerance {config.spread_tolerance:g}x)")
    max_lr = suggestions[config.rule]
    return LrRangeResult(curves=list(curves), suggestions=suggestions, spread=spread,
                         rule=config.rule, measured_max_lr=max_lr, max_lr=max_lr,
                         base_lr=config.base_fraction * max_lr, problems=problems,
                         config=asdict(config))


def momentum_note(num_steps: int, momentum: float) -> str | None:
    """A warning when the ramp is shorter than 10 momentum decay times: with heavy-ball
    momentum β an error oscillates and decays by √β per step, 2/ln(1/β) steps per e-fold
    (β 0.9: 19 steps, so 190 for the ramp); a shorter ramp reads the oscillation's first
    overshoot, far below the lr where training diverges (the known-answer test shows it)."""
    if not 0 < momentum < 1:
        return None
    need = math.ceil(10 * 2 / math.log(1 / momentum))
    if num_steps >= need:
        return None
    return (f"short ramp: {num_steps} steps with momentum {momentum:g}, whose oscillations take "
            f"{2 / math.log(1 / momentum):.0f} steps to decay by e; at least {need} steps read "
            "the divergence rather than the first overshoot")


# --------------------------------------------------------------------------- result
@dataclass
class LrRangeResult:
    """The curves of one LR range test (its repeats) and the bounds they give."""

    curves: list[LrRangeCurve]
    """Every repeat's curve."""
    suggestions: dict[str, float]
    """``max_lr`` of every rule in :data:`RULES`: the (geometric) median over the repeats."""
    spread: dict[str, list[float]]
    """``[min, max]`` of every rule's ``max_lr`` over the repeats."""
    rule: str
    """The rule behind ``measured_max_lr``."""
    measured_max_lr: float
    """The chosen rule's median ``max_lr``, as measured."""
    max_lr: float
    """The upper CLR bound handed on: ``measured_max_lr``, or the fallback's."""
    base_lr: float
    """The lower CLR bound handed on."""
    problems: list[str] = field(default_factory=list)
    """Why the measured bounds cannot be trusted (empty: they can)."""
    warnings: list[str] = field(default_factory=list)
    """What the reader should know that does not replace the bounds (e.g. a ramp short for the
    optimizer's momentum)."""
    bounds_source: str = "lr_find"
    """``lr_find``, or the fallback that replaced the measured bounds and why."""
    config: dict[str, Any] = field(default_factory=dict)
    """The :class:`LrRangeConfig` used, as a dict."""

    # the first repeat's curve, for one-curve readers
    @property
    def lrs(self) -> list[float]:
        return self.curves[0].lrs

    @property
    def losses(self) -> list[float]:
        return self.curves[0].losses

    @property
    def smoothed(self) -> list[float]:
        return self.curves[0].smoothed

    @property
    def stop_reason(self) -> str:
        return self.curves[0].stop_reason

    @property
    def stopped_early(self) -> bool:
        return self.curves[0].stopped_early

    @property
    def trusted(self) -> bool:
        """True when the measured bounds have no problem."""
        return not self.problems

    def bounds(self) -> tuple[float, float]:
        """``(base_lr, max_lr)``."""
        return self.base_lr, self.max_lr

    def fall_back(self, base_lr: float, max_lr: float, source: str) -> "LrRangeResult":
        """Hand on ``(base_lr, max_lr)`` from ``source`` instead of the measured bounds."""
        self.base_lr, self.max_lr, self.bounds_source = float(base_lr), float(max_lr), source
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready); ``lrs``/``losses``/``smoothed``/``stop_reason`` are the
        first repeat's."""
        d = asdict(self)
        d.update(lrs=self.lrs, losses=self.losses, smoothed=self.smoothed,
                 stop_reason=self.stop_reason, stopped_early=self.stopped_early,
                 trusted=self.trusted)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LrRangeResult":
        """Inverse of :meth:`to_dict`."""
        names = {f for f in cls.__dataclass_fields__}
        kept = {k: v for k, v in d.items() if k in names}
        kept["curves"] = [LrRangeCurve(**c) for c in d["curves"]]
        return cls(**kept)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Loss vs lr (log x) of every repeat, the suggestions (median, spread band of the
        chosen rule) and the bounds handed on, written as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for k, c in enumerate(self.curves):
            ax.plot(c.lrs, c.losses, color="0.75", lw=0.7,
                    label="loss" if k == 0 else None)
            ax.plot(c.lrs, c.smoothed, color="C0", lw=1.6, alpha=0.9 if k == 0 else 0.5,
                    label=f"smoothed loss ({len(self.curves)} repeat"
                          f"{'s' if len(self.curves) > 1 else ''})" if k == 0 else None)
        for k, (rule, lr) in enumerate(self.suggestions.items()):
            chosen = rule == self.rule
            ax.axvline(lr, color=f"C{k + 1}", ls="-" if chosen else "--", lw=1.5 if chosen else 1,
                       label=f"{rule}: {lr:.3g}" + (" (chosen)" if chosen else ""))
        lo, hi = self.spread[self.rule]
        if len(self.curves) > 1:
            ax.axvspan(lo, hi, color="C1", alpha=0.08, label=f"{self.rule} over repeats "
                                                             f"{lo:.3g}–{hi:.3g}")
        ax.axvspan(self.base_lr, self.max_lr, color="C2", alpha=0.12,
                   label=f"bounds handed on {self.base_lr:.3g}–{self.max_lr:.3g}"
                         + ("" if self.bounds_source == "lr_find" else " (fallback)"))
        raw = np.concatenate([np.asarray(c.losses) for c in self.curves])
        smooth_all = np.concatenate([np.asarray(c.smoothed) for c in self.curves])
        if len(raw):
            low = min(float(np.min(smooth_all)), float(np.percentile(raw, 5)))
            high = float(np.percentile(smooth_all, 95))
            ax.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.25 * (high - low + 1e-12))
        ax.set_xlabel("learning rate (log scale)")
        mode = (self.config or {}).get("loss", "train")
        ax.set_ylabel("validation loss" if mode == "val" else "training loss")
        ax.set_title(title or f"LR range test ({self.rule} rule)", fontsize=10)
        if self.problems:
            ax.text(0.01, 0.02, "\n".join(p[:95] for p in self.problems[:3]),
                    transform=ax.transAxes, fontsize=6.5, color="C3", va="bottom")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path
