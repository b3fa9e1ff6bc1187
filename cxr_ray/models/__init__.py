"""Model registry: ``create_model(name, ...)`` → backbone + the docs/study.md §4 head (:mod:`.head`).

Backbones (docs/study.md §4): ``mobilenet_v1`` (:mod:`.mobilenet_v1`, with a width multiplier),
``alexnet`` and ``densenet121`` (:mod:`.torchvision_backbones`). Every model takes grayscale
input as one channel (``in_chans=1``): the first convolution has one input channel, so the data
moved is not tripled; ImageNet RGB weights are folded into it by summing over the colour axis
(the sum, not the mean, keeps the response to a gray image ``(v, v, v)`` unchanged).

ImageNet weights, never downloaded:

* ``weights=PATH`` loads ``torch.load(PATH, map_location="cpu", weights_only=True)``: a
  state_dict in torchvision's format (``features.*`` keys; ``classifier.*`` keys are ignored,
  the head is always new). For ``mobilenet_v1`` that format is
  ``MobileNetV1(num_classes=1000).state_dict()``. A ``{"state_dict": ...}`` or ``{"model": ...}``
  wrapper and a ``module.`` prefix are accepted. The backbone loads strictly: missing or
  unexpected keys, or shapes that do not fit, are a :class:`UserError` naming a few of them.
* ``pretrained="auto"`` (default) and no ``weights``: torchvision's hub cache file
  (``torch.hub.get_dir()/checkpoints/<torchvision's file name>``) is loaded if it exists, else the
  backbone starts from random init. ``pretrained=True`` makes a missing file an error;
  ``pretrained=False`` never looks. ``mobilenet_v1`` has no torchvision weights: only
  ``weights=PATH``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_ray.errors import UserError
from cxr_ray.models.head import ClassifierHead, CxrClassifier, HeadConfig, PenalizedLinear
from cxr_ray.models.mobilenet_v1 import MobileNetV1
from cxr_ray.models.torchvision_backbones import (
    AlexNetFeatures,
    DenseNet121Features,
    remap_densenet_keys,
    torchvision_weight_filename,
)

__all__ = [
    "BackboneSpec", "ClassifierHead", "CxrClassifier", "HeadConfig", "MobileNetV1",
    "ModelConfig", "PenalizedLinear", "adapt_input_conv", "build_model", "create_model",
    "describe", "hub_cache_path", "list_models", "load_backbone_weights", "parameter_count",
    "register_backbone",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and load its ImageNet weights."""

    build: Callable[[float, int], nn.Module]
    """``build(width, in_chans)`` → a module with ``num_features`` whose forward gives a map."""
    first_conv: str
    """state_dict key of the first convolution's weight (folded for grayscale)."""
    hub_file: str | None = None
    """torchvision's hub-cache file name for the ImageNet weights; None: none exist."""
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """Key renaming applied to a weights file before loading (old checkpoint formats)."""
    has_width: bool = False
    """Whether ``width`` (the width multiplier) applies."""


def _build_mobilenet(width: float, in_chans: int) -> nn.Module:
    return MobileNetV1(width=width, in_chans=in_chans, num_classes=0)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, spec: BackboneSpec) -> None:
    """Add (or replace) a backbone under ``name``."""
    _REGISTRY[name] = spec


def list_models() -> list[str]:
    """Registered model names."""
    return sorted(_REGISTRY)


register_backbone("mobilenet_v1", BackboneSpec(_build_mobilenet, "features.0.0.weight",
                                               has_width=True))
register_backbone("alexnet", BackboneSpec(lambda w, c: AlexNetFeatures(c), "features.0.weight",
                                          hub_file=torchvision_weight_filename("alexnet")))
register_backbone("densenet121", BackboneSpec(
    lambda w, c: DenseNet121Features(c), "features.conv0.weight",
    hub_file=torchvision_weight_filename("densenet121"), remap=remap_densenet_keys))


# --------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    """Which network to build and where its ImageNet weights come from."""

    name: str = "mobilenet_v1"
    """Registry name: ``mobilenet_v1``, ``alexnet`` or ``densenet121``."""
    width: float = 1.0
    """MobileNetV1 width multiplier (alpha); must be 1.0 for the others."""
    in_chans: int = 1
    """Input channels: 1 for grayscale X-rays (RGB weights are folded), 3 for RGB."""
    weights: str | None = None
    """Path of an ImageNet state_dict to load into the backbone (``weights_only=True``)."""
    pretrained: str | bool = "auto"
    """Without ``weights``: ``"auto"`` use torchvision's cache file if present, ``True`` require
    it, ``False`` random init."""
    dropout: float = 0.5
    """Head dropout after global average pooling."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The head's widths and penalty weights (``dropout`` above overrides ``head.dropout``)."""


def create_model(name: str, *, width: float = 1.0, in_chans: int = 1,
                 weights: str | Path | None = None, pretrained: str | bool = "auto",
                 dropout: float = 0.5, head: HeadConfig | None = None) -> CxrClassifier:
    """Build ``name`` with the docs/study.md §4 head; returns a :class:`CxrClassifier` (logits ``(N,)``,
    ``.penalty()`` for the loss)."""
    return build_model(ModelConfig(name=name, width=width, in_chans=in_chans,
                                   weights=None if weights is None else str(weights),
                                   pretrained=pretrained, dropout=dropout,
                                   head=head or HeadConfig()))


def build_model(cfg: ModelConfig) -> CxrClassifier:
    """Build the model a :class:`ModelConfig` describes (see :func:`create_model`)."""
    spec = _REGISTRY.get(cfg.name)
    if spec is None:
        raise UserError(f"unknown model {cfg.name!r}; valid: {', '.join(list_models())}")
    if not spec.has_width and cfg.width != 1.0:
        raise UserError(f"model {cfg.name!r} has no width multiplier; use width=1.0")
    if cfg.width <= 0:
        raise UserError(f"width must be > 0, got {cfg.width}")
    if cfg.in_chans < 1:
        raise UserError(f"in_chans must be >= 1, got {cfg.in_chans}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    pretrained = _parse_pretrained(cfg.pretrained)

    backbone = spec.build(cfg.width, cfg.in_chans)
    source = _weights_source(cfg.name, spec, cfg.weights, pretrained)
    if source is not None:
        load_backbone_weights(backbone, source, first_conv=spec.first_conv,
                              remap=spec.remap, model_name=cfg.name)
    head = HeadConfig(**{**cfg.head.__dict__, "dropout": cfg.dropout})
    return CxrClassifier(backbone, int(backbone.num_features), head, name=cfg.name)


def _parse_pretrained(value: str | bool) -> str | bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v == "auto":
        return "auto"
    if v in ("true", "yes", "1"):
        return True
    if v in ("false", "no", "0"):
        return False
    raise UserError(f"pretrained must be 'auto', true or false, got {value!r}")


def hub_cache_path(name: str) -> Path | None:
    """Where torchvision's hub cache keeps the ImageNet weights of ``name`` (may not exist)."""
    spec = _REGISTRY.get(name)
    if spec is None or spec.hub_file is None:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.hub_file


def _weights_source(name: str, spec: BackboneSpec, weights: str | None,
                    pretrained: str | bool) -> Path | None:
    if weights is not None:
        return Path(weights).expanduser()
    if pretrained is False:
        return None
    cached = hub_cache_path(name)
    if cached is not None and cached.is_file():
        log.info("%s: ImageNet weights from torchvision's cache %s", name, cached)
        return cached
    if pretrained is True:
        where = (f"put torchvision's {spec.hub_file} at {cached} or pass weights=PATH"
                 if cached is not None else "torchvision has none; pass weights=PATH")
        raise UserError(f"no ImageNet weights for {name}: {where} (nothing is downloaded)")
    log.info("%s: no ImageNet weights found; random init", name)
    return None


# --------------------------------------------------------------------------- weights
def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Fit a first-conv weight ``(out, c, kh, kw)`` to ``in_chans`` inputs.

    1 channel: sum over the colour axis (a gray image gives the same response as its RGB copy).
    Otherwise (timm's rule): repeat the channels cyclically and rescale by ``c / in_chans``.
    """
    c = weight.shape[1]
    if in_chans == c:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def _few(keys: list[str] | set[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone_weights(backbone: nn.Module, path: str | Path, *, first_conv: str,
                          remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                          | None = None, model_name: str = "") -> None:
    """Load an ImageNet state_dict file into ``backbone`` strictly (``features.*`` keys), folding
    the first convolution to the backbone's input channels; :class:`UserError` on any mismatch."""
    path = Path(path)
    label = model_name or type(backbone).__name__
    if not path.is_file():
        raise UserError(f"{label} weights file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise UserError(f"cannot read {label} weights {path} as a torch state_dict "
                        f"(weights_only=True): {type(exc).__name__}: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(f"{path} is not a state_dict of tensors (expected "
                        f"{label}'s ImageNet weights in torchvision's key format)")
    sd = {k.removeprefix("module."): v for k, v in raw.items()}
    if remap is not None:
        sd = remap(sd)
    ignored = [k for k in sd if not k.startswith("features.")]
    sd = {k: v for k, v in sd.items() if k.startswith("features.")}
    if ignored:
        log.debug("%s: ignoring %d non-backbone keys (e.g. %s)", label, len(ignored),
                  _few(ignored, 2))

    own = backbone.state_dict()
    expected = {k for k in own if not k.endswith("num_batches_tracked")}
    got = {k for k in sd if not k.endswith("num_batches_tracked")}
    missing, unexpected = expected - got, got - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
        raise UserError(f"{path} does not match {label}: {'; '.join(parts)}. Expected "
                        f"{label}'s ImageNet state_dict in torchvision's format "
                        f"(keys like {next(iter(own))!r})")
    if first_conv in sd:
        sd[first_conv] = adapt_input_conv(sd[first_conv], own[first_conv].shape[1])
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in expected
           if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"{path} does not fit {label}: {len(bad)} shape mismatch(es), e.g. "
                        f"{'; '.join(sorted(bad)[:3])} (another width or variant?)")
    backbone.load_state_dict(sd, strict=True)
    log.info("%s: loaded ImageNet weights from %s", label, path)


def parameter_count(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (the Keras count adds BN moving statistics; see mobilenet_v1)."""
    return sum(p.numel() for p in module.parameters()
               if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> dict[str, Any]:
    """A small summary for logs: name and parameter counts."""
    return {"name": getattr(model, "name", type(model).__name__),
            "parameters": parameter_count(model),
            "trainable": parameter_count(model, trainable_only=True)}
