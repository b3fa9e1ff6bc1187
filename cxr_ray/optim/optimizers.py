"""Optimizers of the study (docs/study.md §5): SGD with momentum, Adam, RMSprop.

The optimizer owns only the update rule. The Keras ``decay`` argument, which the study used
on every optimizer (Hernia's Adam included), is an lr policy here: ``time_decay`` or any policy
with ``PolicyConfig.decay`` (see :mod:`cxr_ray.optim.schedules`), stepped once per optimizer step.

Defaults follow Keras where the study relied on them: SGD momentum 0.9 (Table 4), Adam
``betas=(0.9, 0.999)`` (Table 4's "momentum 0.9" for Hernia is beta1), ``eps=1e-7`` for Adam and
RMSprop, RMSprop ``rho=0.9`` and momentum 0 (torch's RMSprop defaults are alpha 0.99, eps 1e-8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cxr_ray.errors import UserError
from cxr_ray.optim.presets import TABLE4_MOMENTUM

#: Optimizer names :func:`build_optimizer` accepts.
OPTIMIZERS = ("sgd", "adam", "rmsprop")


@dataclass
class OptimizerConfig:
    """One optimizer. The lr here is only the starting value; the lr policy overrides it."""

    name: str = "sgd"
    """``sgd``, ``adam`` or ``rmsprop``."""
    lr: float = 0.01
    """Initial lr (the policy sets the lr of step 0 on construction anyway)."""
    momentum: float | None = None
    """SGD/RMSprop momentum, Adam beta1. ``None``: SGD 0.9 (Table 4), Adam 0.9, RMSprop 0.0."""
    nesterov: bool = False
    """SGD only: Nesterov momentum (Keras default off)."""
    beta2: float = 0.999
    """Adam only: second-moment decay (Keras default)."""
    rho: float = 0.9
    """RMSprop only: squared-gradient decay (Keras ``rho``; torch calls it ``alpha``)."""
    eps: float = 1e-7
    """Adam/RMSprop epsilon (Keras default 1e-7)."""
    weight_decay: float = 0.0
    """torch's L2 term folded into the gradient; 0 because the study's penalties are explicit
    loss terms (:meth:`cxr_ray.models.head.CxrClassifier.penalty`)."""


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], name: str = "sgd",
                    lr: float = 0.01, momentum: float | None = None,
                    **kwargs: object) -> torch.optim.Optimizer:
    """``build_optimizer(model.parameters(), "sgd", lr=0.01)`` (or pass an OptimizerConfig's
    fields). ``momentum=None`` picks the per-optimizer default documented above."""
    cfg = OptimizerConfig(name=str(name).lower(), lr=lr, momentum=momentum, **kwargs)  # type: ignore[arg-type]
    return optimizer_from_config(params, cfg)


def momentum_of(cfg: OptimizerConfig) -> float:
    """The momentum the optimizer runs with: SGD/RMSprop momentum or Adam's beta1, defaults
    resolved."""
    if cfg.momentum is not None:
        return float(cfg.momentum)
    return {"sgd": TABLE4_MOMENTUM, "adam": 0.9}.get(cfg.name, 0.0)


def optimizer_from_config(params: Iterable[torch.nn.Parameter] | Iterable[dict],
                          cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Build the torch optimizer an :class:`OptimizerConfig` describes."""
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    if not cfg.lr > 0:
        raise UserError(f"optimizer lr must be > 0, got {cfg.lr}")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum_of(cfg),
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(momentum_of(cfg), cfg.beta2),
                                eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rho, eps=cfg.eps,
                               momentum=momentum_of(cfg),
                               weight_decay=cfg.weight_decay)
