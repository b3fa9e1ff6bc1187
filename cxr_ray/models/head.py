"""The study's classification head (docs/study.md §4) and its Keras-style penalties, plus the model wrapper.

Head, the same for every backbone and cohort::

    global average pooling → dropout 0.5 → dense 250 → BN → dense 50 → BN → dense 10 → BN
    (linear activations) → dense 1

:class:`CxrClassifier` returns **logits** of shape ``(N,)``: train with
``torch.nn.BCEWithLogitsLoss`` and apply ``torch.sigmoid`` at evaluation. That is the
numerically stable form of Keras' "dense 1 with sigmoid" + binary cross-entropy (the log-sum-exp
is fused instead of taking ``log(sigmoid(z))``), with the same optimum.

Penalties (Keras semantics, tf.keras 2.x), for each penalised dense layer ``y = x W^T + b``::

    kernel:   0.001 * sum|W| + 0.01 * sum W**2      (Keras l2 has no factor 1/2)
    bias:     0.01 * sum b**2
    activity: 0.001 * sum(y**2) / batch_size        (tf.keras divides activity losses by the
                                                     batch size)

:meth:`CxrClassifier.penalty` returns their sum as one scalar tensor, the activity part from the
most recent forward pass; the training loop adds it to the loss:
``loss = bce(model(x), y) + model.penalty()``.

**Decided:** the three hidden dense layers (250, 50, 10) are penalised; the final dense-1
output layer is not (``HeadConfig.penalize_output``). The study describes the regularisers in the
paragraph on the hidden dense layers, each followed by BN, and introduces the sigmoid output
layer separately ("Finally, ..."); an activity penalty on the output would also pull every
prediction towards 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HeadConfig:
    """The docs/study.md §4 head and its penalty weights."""

    widths: tuple[int, ...] = (250, 50, 10)
    """Hidden dense widths, each followed by BN, linear activation."""
    dropout: float = 0.5
    """Dropout after global average pooling."""
    kernel_l1: float = 0.001
    """Kernel L1 weight: ``kernel_l1 * sum|W|``."""
    kernel_l2: float = 0.01
    """Kernel L2 weight: ``kernel_l2 * sum W**2`` (no 1/2, as in Keras)."""
    bias_l2: float = 0.01
    """Bias L2 weight: ``bias_l2 * sum b**2``."""
    activity_l2: float = 0.001
    """Activity L2 weight: ``activity_l2 * sum(y**2) / batch_size`` on each dense output."""
    penalize_output: bool = False
    """Also penalise the final dense-1 layer (its logit). Off: see the module docstring."""
    bn_eps: float = 1e-3
    """BatchNorm epsilon (Keras default 1e-3; torch's is 1e-5)."""
    bn_momentum: float = 0.1
    """BatchNorm running-stat momentum, torch convention (Keras' 0.99 is torch 0.01; 0.1 settles
    faster in short runs)."""


class PenalizedLinear(nn.Linear):
    """A dense layer that knows its Keras penalties and keeps the activity term of its last call.

    The activity term is recomputed on every forward, so after ``model(x)`` it belongs to that
    batch (a graph tensor: it backpropagates into the layer, as in Keras).
    """

    def __init__(self, in_features: int, out_features: int, *, kernel_l1: float = 0.0,
                 kernel_l2: float = 0.0, bias_l2: float = 0.0, activity_l2: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        self.kernel_l1 = kernel_l1
        self.kernel_l2 = kernel_l2
        self.bias_l2 = bias_l2
        self.activity_l2 = activity_l2
        self.last_activity_penalty: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.activity_l2:
            self.last_activity_penalty = self.activity_l2 * y.pow(2).sum() / y.shape[0]
        return y

    def weight_penalty(self) -> torch.Tensor:
        """Kernel L1 + kernel L2 + bias L2."""
        w, b = self.weight, self.bias
        return (self.kernel_l1 * w.abs().sum() + self.kernel_l2 * w.pow(2).sum()
                + self.bias_l2 * b.pow(2).sum())

    def penalty(self) -> torch.Tensor:
        """Weight penalties plus the activity penalty of the most recent forward (0 if none)."""
        p = self.weight_penalty()
        if self.activity_l2 and self.last_activity_penalty is not None:
            p = p + self.last_activity_penalty
        return p


class ClassifierHead(nn.Module):
    """GAP → dropout → [dense → BN] × len(widths) → dense 1. Input: a feature map ``(N, C, H, W)``
    (or already pooled ``(N, C)``); output: logits ``(N,)``."""

    def __init__(self, in_features: int, config: HeadConfig | None = None) -> None:
        super().__init__()
        cfg = config or HeadConfig()
        self.config = cfg
        pen = dict(kernel_l1=cfg.kernel_l1, kernel_l2=cfg.kernel_l2, bias_l2=cfg.bias_l2,
                   activity_l2=cfg.activity_l2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        layers: list[nn.Module] = []
        width = in_features
        for out in cfg.widths:
            layers += [PenalizedLinear(width, out, **pen),
                       nn.BatchNorm1d(out, eps=cfg.bn_eps, momentum=cfg.bn_momentum)]
            width = out
        self.hidden = nn.Sequential(*layers)
        self.output = PenalizedLinear(width, 1, **(pen if cfg.penalize_output else {}))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pool(features).flatten(1) if features.dim() == 4 else features
        x = self.hidden(self.dropout(x))
        return self.output(x).squeeze(-1)

    def penalized_layers(self) -> list[PenalizedLinear]:
        """The dense layers whose penalties count."""
        layers = [m for m in self.hidden if isinstance(m, PenalizedLinear)]
        return layers + ([self.output] if self.config.penalize_output else [])

    def penalty(self) -> torch.Tensor:
        """Sum of the Keras penalties of the penalised dense layers (one scalar tensor)."""
        return torch.stack([m.penalty() for m in self.penalized_layers()]).sum()


class CxrClassifier(nn.Module):
    """A backbone (image → feature map) with the :class:`ClassifierHead`. ``forward`` → logits
    ``(N,)``; :meth:`penalty` → the loss term to add."""

    def __init__(self, backbone: nn.Module, num_features: int, head: HeadConfig | None = None,
                 *, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.num_features = num_features
        self.head = ClassifierHead(num_features, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def penalty(self) -> torch.Tensor:
        """Keras kernel/bias/activity penalties of the head; activity from the last forward."""
        return self.head.penalty()
