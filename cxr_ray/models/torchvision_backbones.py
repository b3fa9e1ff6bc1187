"""AlexNet and DenseNet-121 feature extractors from torchvision, for the study's backbone comparison.

Each builder returns a module with a ``features`` attribute (torchvision's own ``features``
Sequential, so its ``state_dict()`` keys are exactly the ``features.*`` keys of torchvision's
ImageNet files) whose ``forward`` returns the last feature map for the GAP head.

* ``alexnet``: torchvision's ``AlexNet.features`` (256 channels). Its 11×11/4 stem and three
  3×3/2 max-pools need inputs of at least **63 px** (63 px → a 1×1 map); torchvision's
  ``AdaptiveAvgPool2d(6)`` + 58 M-parameter classifier are dropped because the head pools
  globally.
* ``densenet121``: torchvision's ``DenseNet.features`` followed by the ReLU that torchvision
  applies in ``forward`` (1024 channels). Inputs of at least **29 px** (29 px → a 1×1 map).

Grayscale: the first convolution is rebuilt with ``in_chans`` input channels; ImageNet weights
are folded into it on loading (see :func:`cxr_ray.models.adapt_input_conv`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

#: Smallest input side (px) each backbone accepts.
MIN_INPUT_SIZE = {"alexnet": 63, "densenet121": 29}

# torchvision's old DenseNet checkpoints use 'norm.1'-style keys; its loader renames them.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _check_size(x: torch.Tensor, name: str) -> None:
    if min(x.shape[-2:]) < MIN_INPUT_SIZE[name]:
        raise ValueError(f"{name} needs inputs of at least {MIN_INPUT_SIZE[name]} px, got "
                         f"{tuple(x.shape[-2:])}")


def _replace_first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    if conv.in_channels == in_chans:
        return conv
    return nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet's convolutional part; ``forward`` → ``(N, 256, h, w)``."""

    num_features = 256

    def __init__(self, in_chans: int = 1) -> None:
        super().__init__()
        # Build on the meta device so the unused 58 M-parameter classifier costs nothing, then
        # give the features real storage with torchvision's (= torch's default) init.
        import torchvision  # here, not at module import: it costs seconds in every process

        with torch.device("meta"):
            features = torchvision.models.alexnet(weights=None).features
        features[0] = _replace_first_conv(features[0], in_chans)
        self.features = features.to_empty(device="cpu")
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(x, "alexnet")
        return self.features(x)


class DenseNet121Features(nn.Module):
    """torchvision DenseNet-121's ``features`` + ReLU; ``forward`` → ``(N, 1024, h, w)``."""

    num_features = 1024

    def __init__(self, in_chans: int = 1) -> None:
        super().__init__()
        import torchvision

        self.features = torchvision.models.densenet121(weights=None).features
        self.features.conv0 = _replace_first_conv(self.features.conv0, in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(x, "densenet121")
        return F.relu(self.features(x))


#: The file names torchvision's hub cache uses for the ImageNet weights (the basename of
#: ``AlexNet_Weights.IMAGENET1K_V1.url`` etc.; a test checks them against torchvision's enums,
#: kept literal here because importing torchvision costs seconds in every Ray worker).
TORCHVISION_WEIGHT_FILES = {"alexnet": "alexnet-owt-7be5be79.pth",
                            "densenet121": "densenet121-a639ec97.pth"}


def torchvision_weight_filename(name: str) -> str:
    """The file name torchvision's hub cache uses for the ImageNet weights of ``name``
    (nothing is downloaded)."""
    return TORCHVISION_WEIGHT_FILES[name]


def remap_densenet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old ``...denselayerN.norm.1.weight`` keys to ``...denselayerN.norm1.weight``."""
    out = {}
    for key, value in state_dict.items():
        m = _DENSENET_OLD_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out
