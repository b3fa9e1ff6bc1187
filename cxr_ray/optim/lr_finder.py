"""The LR range test ("LR finder", docs/study.md §7; Smith 2017; the study's §A6).

Train for a while with the lr growing exponentially every optimizer step from ``min_lr`` to
``max_lr``, record the loss, smooth it, stop when it diverges, and read bounds for a cyclical
policy off the curve.

This module holds the pieces; the range test itself runs in
:func:`cxr_ray.train.lr_find.range_test`, in the process or Ray Train fit that trained the model
(the trained run is left untouched):

* :class:`LrRangeTest` — the ramp and the bookkeeping: ``lr_at(i)`` gives the lr of step ``i``;
  after the step, ``record(i, loss)`` stores the (globally averaged) loss and answers "stop?".
  The loop owns the step counter, as for every lr policy (:mod:`cxr_ray.optim.schedules`).
* :func:`suggest` — a pure function of the curve, with three rules:

  ``paper``     the study's: ``max_lr`` = the lr at the minimum of the smoothed loss.
  ``steepest``  the lr where the smoothed loss falls fastest against ``log(lr)``.
  ``valley``    fastai's: the longest descending stretch of the smoothed loss (the longest
                decreasing subsequence); the point about 2/3 of the way down it.

  Every rule gives ``max_lr``; ``base_lr = base_fraction × max_lr`` (the study: 1/4). As fastai
  does, the first 10 % of the points and the last 5 are left out before applying a rule (the
  start is dominated by smoothing warm-up, the end by divergence).
* :class:`LrRangeResult` — the curve and the suggestions (``to_json()``, ``plot(path)``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_ray.errors import UserError

#: Suggestion rules :func:`suggest` knows.
RULES = ("paper", "steepest", "valley")


@dataclass
class LrRangeConfig:
    """One LR range test."""

    min_lr: float = 1e-7
    """lr of the first step (the study: 1e-7)."""
    max_lr: float = 1.0
    """lr of the last step (the study: 1)."""
    num_steps: int = 100
    """Optimizer steps of the ramp (the study: 1–5 epochs' worth)."""
    smoothing: float = 0.98
    """Exponential smoothing factor beta of the loss (with bias correction); 0 = none."""
    diverge_factor: float = 4.0
    """Stop once the smoothed loss exceeds this multiple of the best smoothed loss so far."""
    rule: str = "paper"
    """Suggestion rule for the returned ``(base_lr, max_lr)``: one of :data:`RULES`."""
    base_fraction: float = 0.25
    """``base_lr = base_fraction * max_lr`` (the study: one fourth)."""
    skip_start: float = 0.1
    """Fraction of the first points ignored by the rules (fastai: 10 %)."""
    skip_end: int = 5
    """Number of last points ignored by the rules (fastai: 5)."""

    def validate(self) -> "LrRangeConfig":
        """Raise :class:`UserError` for nonsensical settings; returns self."""
        if not (0 < self.min_lr < self.max_lr) or not math.isfinite(self.max_lr):
            raise UserError(f"LR range test needs 0 < min_lr < max_lr, got {self.min_lr:g}, "
                            f"{self.max_lr:g}")
        if self.num_steps < 2:
            raise UserError(f"LR range test needs num_steps >= 2, got {self.num_steps}")
        if not 0 <= self.smoothing < 1:
            raise UserError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.diverge_factor <= 1:
            raise UserError(f"diverge_factor must be > 1, got {self.diverge_factor}")
        if self.rule not in RULES:
            raise UserError(f"unknown suggestion rule {self.rule!r}; valid: {', '.join(RULES)}")
        if not 0 < self.base_fraction <= 1:
            raise UserError(f"base_fraction must be in (0, 1], got {self.base_fraction}")
        return self


# --------------------------------------------------------------------------- core
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
        self.smoothed: list[float] = []
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
        beta = self.config.smoothing
        self._avg = beta * self._avg + (1 - beta) * loss
        smooth = self._avg / (1 - beta ** (len(self.losses) + 1))
        self.lrs.append(self.lr_at(i))
        self.losses.append(loss)
        self.smoothed.append(smooth)
        self.best = min(self.best, smooth)
        if smooth > self.config.diverge_factor * self.best:
            self.stop_reason = (f"diverged at step {i} (lr {self.lr_at(i):.3g}): smoothed loss "
                                f"{smooth:.4g} > {self.config.diverge_factor:g} x best "
                                f"{self.best:.4g}")
            return True
        if i >= self.config.num_steps - 1:
            self.stop_reason = "reached max_lr"
            return True
        return False

    def result(self) -> "LrRangeResult":
        """Suggestions of every rule and the chosen ``(base_lr, max_lr)``."""
        c = self.config
        if len(self.smoothed) < 3:
            raise UserError(f"LR range test recorded only {len(self.smoothed)} step(s) "
                            f"({self.stop_reason or 'no data'}); lower min_lr or give more "
                            "batches")
        lrs, sm = trim(self.lrs, self.smoothed, c.skip_start, c.skip_end)
        suggestions = {rule: suggest(lrs, sm, rule) for rule in RULES}
        max_lr = suggestions[c.rule]
        return LrRangeResult(
            lrs=list(self.lrs), losses=list(self.losses), smoothed=list(self.smoothed),
            suggestions=suggestions, rule=c.rule, max_lr=max_lr,
            base_lr=c.base_fraction * max_lr,
            stopped_early=len(self.lrs) < c.num_steps, stop_reason=self.stop_reason,
            config=asdict(c))


# --------------------------------------------------------------------------- rules
def trim(lrs: list[float], smoothed: list[float], skip_start: float = 0.1,
         skip_end: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Drop the first ``skip_start`` fraction and the last ``skip_end`` points (fastai); keeps
    everything when that would leave fewer than 3 points."""
    a, b = np.asarray(lrs, float), np.asarray(smoothed, float)
    lo, hi = int(len(a) * skip_start), len(a) - skip_end
    if hi - lo < 3:
        return a, b
    return a[lo:hi], b[lo:hi]


def suggest(lrs: Iterable[float], smoothed: Iterable[float], rule: str = "paper") -> float:
    """``max_lr`` suggested by ``rule`` for a (smoothed) loss-vs-lr curve; see the module doc."""
    x = np.asarray(list(lrs), float)
    y = np.asarray(list(smoothed), float)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("suggest needs two equally long curves of at least 2 points")
    if rule == "paper":
        return float(x[int(np.argmin(y))])
    if rule == "steepest":
        slope = np.diff(y) / np.diff(np.log(x))
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


# --------------------------------------------------------------------------- result
@dataclass
class LrRangeResult:
    """The curve of one LR range test and what it suggests."""

    lrs: list[float]
    """lr of each recorded step."""
    losses: list[float]
    """Raw training loss of each recorded step."""
    smoothed: list[float]
    """Bias-corrected exponentially smoothed loss."""
    suggestions: dict[str, float]
    """``max_lr`` suggested by every rule in :data:`RULES`."""
    rule: str
    """The rule behind ``max_lr``/``base_lr``."""
    max_lr: float
    """Suggested upper CLR bound."""
    base_lr: float
    """Suggested lower CLR bound (``base_fraction * max_lr``)."""
    stopped_early: bool = False
    """True when the test stopped before the end of the ramp."""
    stop_reason: str = ""
    """Why it stopped."""
    config: dict[str, Any] = field(default_factory=dict)
    """The :class:`LrRangeConfig` used, as a dict."""

    def bounds(self) -> tuple[float, float]:
        """``(base_lr, max_lr)``."""
        return self.base_lr, self.max_lr

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LrRangeResult":
        """Inverse of :meth:`to_dict`."""
        return cls(**d)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Loss vs lr (log x) with the suggestions marked, written as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(self.lrs, self.losses, color="0.75", lw=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", lw=1.8, label="smoothed loss")
        ax.set_xscale("log")
        for k, (rule, lr) in enumerate(self.suggestions.items()):
            chosen = rule == self.rule
            ax.axvline(lr, color=f"C{k + 1}", ls="-" if chosen else "--", lw=1.5 if chosen else 1,
                       label=f"{rule}: {lr:.3g}" + (" (max_lr)" if chosen else ""))
        ax.axvspan(self.base_lr, self.max_lr, color="C1", alpha=0.12,
                   label=f"CLR range {self.base_lr:.3g}–{self.max_lr:.3g}")
        smooth, raw = np.asarray(self.smoothed), np.asarray(self.losses)
        if len(smooth):
            lo = min(float(np.min(smooth)), float(np.percentile(raw, 5)))
            hi = float(np.percentile(smooth, 95))
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.25 * (hi - lo + 1e-12))
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title(title or f"LR range test ({self.rule} rule)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path
