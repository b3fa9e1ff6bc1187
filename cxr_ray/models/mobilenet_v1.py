"""MobileNetV1 (Howard et al. 2017, arXiv:1704.04861): depthwise-separable convolutions with a
width multiplier. Not in torchvision; the study used the Keras ImageNet model.

Layout (width 1.0, ImageNet 224² input)::

    conv 3×3/2, 32 → 13 × [depthwise 3×3 (stride s) → BN → act → pointwise 1×1 → BN → act]
    channels 64, 128, 128, 256, 256, 512 ×6, 1024, 1024; strides 1,2,1,2,1,2,1,1,1,1,1,2,1

Every convolution has no bias and is followed by BN (eps 1e-3 as in Keras) and ReLU6 (Keras'
activation; ``act="relu"`` gives the paper's ReLU). Channels are ``width × c`` rounded to a
multiple of 8 (at least 8); for the published widths 0.25/0.5/0.75/1.0 that equals Keras'
``int(width × c)``.

Parameter count at width 1.0 (torch ``parameters()``; Keras also counts BN moving mean/var):
feature extractor 3,206,976 trainable + 21,888 BN statistics = 3,228,864 (Keras
``include_top=False``); with the 1000-class classifier (a 1024→1000 dense, Keras' 1×1 conv)
4,231,976 + 21,888 = 4,253,864 (Keras' total).

``MobileNetV1(num_classes=1000)`` is the ImageNet classifier form; its ``state_dict()`` keys
(``features.*``, ``classifier.*``) are the format ``create_model("mobilenet_v1", weights=PATH)``
loads. ``num_classes=0`` (the default) is the feature extractor alone.
"""

from __future__ import annotations

from torch import nn

#: (pointwise output channels, depthwise stride) of the 13 blocks.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
STEM_CHANNELS = 32


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``width × channels`` rounded to the nearest multiple of ``divisor`` (never below it, never
    more than 10 % below the exact value): the torchvision/timm rule."""
    v = channels * width
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if out < 0.9 * v:
        out += divisor
    return out


def _act(name: str) -> nn.Module:
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"act must be 'relu6' or 'relu', got {name!r}")


class ConvBNAct(nn.Sequential):
    """conv (no bias) → BN → activation; ``groups=in_ch`` makes it depthwise."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: str = "relu6") -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-3),
            _act(act),
        )


class DepthwiseSeparable(nn.Sequential):
    """depthwise 3×3 (stride s) → BN → act → pointwise 1×1 → BN → act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: str = "relu6") -> None:
        super().__init__()
        self.dw = ConvBNAct(in_ch, in_ch, 3, stride, groups=in_ch, act=act)
        self.pw = ConvBNAct(in_ch, out_ch, 1, act=act)


class MobileNetV1(nn.Module):
    """MobileNetV1 feature extractor (``num_classes=0``) or ImageNet-style classifier.

    Args:
        width: the width multiplier (alpha).
        in_chans: input channels (1 for grayscale X-rays, 3 for RGB).
        num_classes: 0 → ``forward`` returns the last feature map ``(N, C, H/32, W/32)``;
            > 0 → GAP → dropout → dense ``num_classes`` logits (the ImageNet form).
        dropout: classifier dropout (Keras default 1e-3); only with ``num_classes > 0``.
        act: ``"relu6"`` (Keras, default) or ``"relu"`` (the paper).
    """

    def __init__(self, width: float = 1.0, in_chans: int = 3, num_classes: int = 0,
                 dropout: float = 1e-3, act: str = "relu6") -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        ch = scale_channels(STEM_CHANNELS, width)
        layers: list[nn.Module] = [ConvBNAct(in_chans, ch, 3, stride=2, act=act)]
        for out, stride in BLOCKS:
            out = scale_channels(out, width)
            layers.append(DepthwiseSeparable(ch, out, stride, act=act))
            ch = out
        self.features = nn.Sequential(*layers)
        self.num_features = ch
        self.classifier: nn.Module | None = None
        if num_classes > 0:
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                            nn.Dropout(dropout), nn.Linear(ch, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # noqa: D102
        x = self.features(x)
        return self.classifier(x) if self.classifier is not None else x
