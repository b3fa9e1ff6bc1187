"""Backbones + the docs/study.md §4 head: shapes, gradients, parameter counts, penalties, weight loading."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cxr_ray.errors import UserError
from cxr_ray.models import (
    CxrClassifier,
    HeadConfig,
    MobileNetV1,
    PenalizedLinear,
    adapt_input_conv,
    create_model,
    hub_cache_path,
    list_models,
)
from cxr_ray.models.torchvision_backbones import AlexNetFeatures, remap_densenet_keys


@pytest.fixture(autouse=True)
def _empty_torch_hub(tmp_path, monkeypatch):
    """No test may pick up (or fetch) real ImageNet weights: point the hub cache at tmp."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: one intra-op thread is faster, and on a busy 2-core machine OpenMP
    spin-waiting made DenseNet's 32 px forward 100x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = [("mobilenet_v1", 0.25, 32), ("alexnet", 1.0, 63), ("densenet121", 1.0, 32)]


@pytest.mark.parametrize("name, width, size", CASES)
def test_forward_backward_tiny_inputs(name, width, size):
    torch.manual_seed(0)
    model = create_model(name, width=width, in_chans=1)
    x = torch.randn(2, 1, size, size)
    logits = model(x)
    assert logits.shape == (2,)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1.0]))
    (loss + model.penalty()).backward()
    assert torch.isfinite(logits).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1  # grayscale stays one channel
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2,)


def test_alexnet_minimum_input_is_63px():
    model = create_model("alexnet").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 63, 63)).shape == (1,)
        assert model.backbone.features(torch.randn(1, 1, 63, 63)).shape[-2:] == (1, 1)
        with pytest.raises(RuntimeError):  # torchvision's layers themselves cannot go lower
            model.backbone.features(torch.randn(1, 1, 62, 62))
        with pytest.raises(ValueError, match=r"alexnet needs inputs of at least 63 px, got "
                                             r"\(62, 80\)"):
            model(torch.randn(1, 1, 62, 80))


def test_densenet121_minimum_input_is_29px():
    model = create_model("densenet121").eval()
    with torch.no_grad():
        assert model.backbone.features(torch.randn(1, 1, 29, 29)).shape == (1, 1024, 1, 1)
        with pytest.raises(RuntimeError):
            model.backbone.features(torch.randn(1, 1, 28, 28))
        with pytest.raises(ValueError, match="densenet121 needs inputs of at least 29 px"):
            model(torch.randn(1, 1, 28, 28))


def test_mobilenet_v1_parameter_counts_match_keras():
    def bn_stats(m):
        return sum(b.numel() for n, b in m.named_buffers() if n.endswith(("running_mean",
                                                                          "running_var")))

    full = MobileNetV1(width=1.0, in_chans=3, num_classes=1000)
    n_params = sum(p.numel() for p in full.parameters())
    assert n_params == 4_231_976  # ≈ 4.2 M trainable in the ImageNet-1000 form
    assert n_params + bn_stats(full) == 4_253_864  # Keras' total (counts BN moving stats)
    feats = full.features
    f_params = sum(p.numel() for p in feats.parameters())
    assert f_params == 3_206_976  # the ≈ 3.2 M feature extractor
    assert f_params + bn_stats(feats) == 3_228_864  # Keras include_top=False
    assert len(feats) == 14  # stem + 13 depthwise-separable blocks
    assert full.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_mobilenet_v1_width_multiplier():
    assert MobileNetV1(width=0.5).num_features == 512
    assert MobileNetV1(width=0.25).num_features == 256
    m = MobileNetV1(width=0.75)
    assert [blk.pw[0].out_channels for blk in list(m.features)[1:4]] == [48, 96, 96]
    strides = [blk.dw[0].stride[0] for blk in list(m.features)[1:]]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]


def test_head_structure():
    model = create_model("mobilenet_v1", width=0.25)
    head = model.head
    assert head.dropout.p == 0.5
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (256, 250), (250, 50), (50, 10), (10, 1)]
    bns = [m for m in head.hidden if isinstance(m, nn.BatchNorm1d)]
    assert [b.num_features for b in bns] == [250, 50, 10]
    assert not any(isinstance(m, (nn.ReLU, nn.Sigmoid)) for m in head.modules())  # linear, logits


def test_penalized_linear_hand_computation():
    layer = PenalizedLinear(2, 1, kernel_l1=0.001, kernel_l2=0.01, bias_l2=0.01, activity_l2=0.001)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.bias.copy_(torch.tensor([0.5]))
    y = layer(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    assert y.squeeze(-1).tolist() == [-0.5, 2.5]
    kernel = 0.001 * 3 + 0.01 * 5  # 0.001*(|1|+|-2|) + 0.01*(1+4)
    bias = 0.01 * 0.25
    activity = 0.001 * (0.25 + 6.25) / 2  # divided by the batch size, as tf.keras does
    assert layer.penalty().item() == pytest.approx(kernel + bias + activity, rel=1e-6)
    assert layer.penalty().item() == pytest.approx(0.05875, rel=1e-6)


class _FeatureMap(nn.Module):
    """A stand-in backbone: a fixed linear map to a 6-channel 2x2 feature map."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


def test_model_penalty_equals_hand_computation():
    torch.manual_seed(0)
    model = CxrClassifier(_FeatureMap(), 6, HeadConfig()).eval()
    x = torch.randn(5, 1, 4, 4)
    model(x)
    got = model.penalty()

    with torch.no_grad():  # by hand: GAP → (dense → BN) x3, summing Keras penalties
        h = model.backbone(x).mean(dim=(2, 3))
        expected = 0.0
        layers = list(model.head.hidden)
        for lin, bn in zip(layers[0::2], layers[1::2]):
            w, b = lin.weight, lin.bias
            y = h @ w.T + b
            expected += 0.001 * w.abs().sum() + 0.01 * (w ** 2).sum() + 0.01 * (b ** 2).sum()
            expected += 0.001 * (y ** 2).sum() / x.shape[0]
            h = (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert got.item() == pytest.approx(float(expected), rel=1e-5)
    assert got.requires_grad  # part of the loss graph

    out = CxrClassifier(_FeatureMap(), 6, HeadConfig(penalize_output=True)).eval()
    out.load_state_dict(model.state_dict())
    out(x)
    w = out.head.output.weight
    assert out.penalty().item() > got.item() + 0.001 * w.abs().sum().item()


def test_unknown_model_and_bad_width():
    with pytest.raises(UserError, match="unknown model 'resnet50'; valid: alexnet, densenet121, "
                                        "mobilenet_v1"):
        create_model("resnet50")
    with pytest.raises(UserError, match="no width multiplier"):
        create_model("alexnet", width=0.5)
    assert list_models() == ["alexnet", "densenet121", "mobilenet_v1"]


def test_adapt_input_conv():
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
    assert adapt_input_conv(w, 1).flatten().tolist() == [0 + 1 + 2, 3 + 4 + 5]
    assert adapt_input_conv(w, 3) is w
    six = adapt_input_conv(w, 6)
    assert six.shape == (2, 6, 1, 1) and torch.allclose(six.sum(1), w.sum(1))


# --------------------------------------------------------------------------- ImageNet weights
def _save(obj, path):
    torch.save(obj, path)
    return path


def test_mobilenet_weights_from_file_fold_rgb(tmp_path):
    torch.manual_seed(1)
    imagenet = MobileNetV1(width=0.25, in_chans=3, num_classes=1000)
    path = _save(imagenet.state_dict(), tmp_path / "mobilenet_v1_025.pth")
    model = create_model("mobilenet_v1", width=0.25, in_chans=1, weights=path)
    got = model.backbone.state_dict()
    src = imagenet.state_dict()
    assert torch.equal(got["features.0.0.weight"], src["features.0.0.weight"].sum(1, keepdim=True))
    for key in got:
        if key != "features.0.0.weight":
            assert torch.equal(got[key], src[key]), key
    rgb = create_model("mobilenet_v1", width=0.25, in_chans=3, weights=path)
    assert torch.equal(rgb.backbone.state_dict()["features.0.0.weight"],
                       src["features.0.0.weight"])
    # a gray image gives the RGB network's response to its 3-channel copy
    gray = torch.rand(1, 1, 32, 32)
    model.eval(), imagenet.eval()
    with torch.no_grad():
        assert torch.allclose(model.backbone(gray), imagenet.features(gray.expand(1, 3, 32, 32)),
                              atol=1e-5)


def _alexnet_imagenet_state():
    """torchvision's AlexNet state_dict layout: RGB ``features.*`` plus classifier keys (kept
    small here; they are ignored on loading whatever their shape)."""
    torch.manual_seed(2)
    tv = AlexNetFeatures(in_chans=3)  # torchvision's own AlexNet.features, RGB
    sd = {**tv.state_dict(), "classifier.1.weight": torch.zeros(4, 4),
          "classifier.6.bias": torch.zeros(4)}
    with torch.device("meta"):  # the real layout, without allocating 61 M parameters
        real = torchvision.models.alexnet(weights=None).state_dict()
    assert {k: v.shape for k, v in real.items() if k.startswith("features.")} == {
        k: v.shape for k, v in sd.items() if k.startswith("features.")}
    return tv, sd


def test_alexnet_torchvision_file_and_hub_cache(tmp_path):
    tv, sd = _alexnet_imagenet_state()
    path = _save(sd, tmp_path / "alexnet.pth")
    model = create_model("alexnet", weights=path)
    assert torch.equal(model.backbone.features[0].weight, tv.features[0].weight.sum(1, True))
    assert torch.equal(model.backbone.features[10].weight, tv.features[10].weight)

    # pretrained="auto" uses torchvision's cache file when present; pretrained=True requires it
    with pytest.raises(UserError, match="no ImageNet weights for alexnet: put torchvision's "
                                        "alexnet-owt-7be5be79.pth"):
        create_model("alexnet", pretrained=True)
    cached = hub_cache_path("alexnet")
    assert cached.name == "alexnet-owt-7be5be79.pth" and not cached.exists()
    cached.parent.mkdir(parents=True)
    _save({"state_dict": sd}, cached)
    auto = create_model("alexnet")
    assert torch.equal(auto.backbone.features[3].weight, tv.features[3].weight)
    off = create_model("alexnet", pretrained=False)
    assert not torch.equal(off.backbone.features[3].weight, tv.features[3].weight)


def test_densenet_old_style_keys(tmp_path):
    tv = torchvision.models.densenet121(weights=None)
    old = {}
    for k, v in tv.state_dict().items():  # torchvision's published file uses 'norm.1' keys
        if k.endswith("num_batches_tracked"):  # and predates these buffers
            continue
        for a in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                k = k.replace(f".{a}{i}.", f".{a}.{i}.")
        old[k] = v
    assert any(".norm.1." in k for k in old)
    assert set(remap_densenet_keys(old)) == {k for k in tv.state_dict()
                                             if not k.endswith("num_batches_tracked")}
    model = create_model("densenet121", weights=_save(old, tmp_path / "densenet121.pth"))
    assert torch.equal(model.backbone.features.conv0.weight,
                       tv.features.conv0.weight.sum(1, keepdim=True))
    assert torch.equal(model.backbone.features.norm5.running_var, tv.features.norm5.running_var)


def test_weight_errors(tmp_path):
    with pytest.raises(UserError, match=r"weights file not found: .*nope\.pth"):
        create_model("mobilenet_v1", weights=tmp_path / "nope.pth")
    with pytest.raises(UserError, match="no ImageNet weights for mobilenet_v1: torchvision has "
                                        "none; pass weights=PATH"):
        create_model("mobilenet_v1", pretrained=True)

    alex = _save(_alexnet_imagenet_state()[1], tmp_path / "alex.pth")
    with pytest.raises(UserError) as err:
        create_model("mobilenet_v1", width=0.25, weights=alex)
    msg = str(err.value)
    assert "does not match mobilenet_v1" in msg and "missing" in msg and "unexpected" in msg
    assert "keys like 'features.0.0.weight'" in msg and "features.0.weight" in msg

    wide = _save(MobileNetV1(width=0.5, num_classes=1000).state_dict(), tmp_path / "w05.pth")
    with pytest.raises(UserError, match="shape mismatch"):
        create_model("mobilenet_v1", width=0.25, weights=wide)

    junk = _save([1, 2, 3], tmp_path / "junk.pth")
    with pytest.raises(UserError, match="not a state_dict"):
        create_model("mobilenet_v1", weights=junk)
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(UserError, match="cannot read"):
        create_model("mobilenet_v1", weights=text)


def test_weight_file_names_match_torchvision():
    # kept literal (importing torchvision costs seconds per Ray worker): must follow torchvision
    from cxr_ray.models.torchvision_backbones import TORCHVISION_WEIGHT_FILES

    assert TORCHVISION_WEIGHT_FILES == {
        "alexnet": torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1],
        "densenet121": torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]}


def test_importing_the_models_does_not_import_torchvision():
    import subprocess
    import sys

    code = "import sys, cxr_ray.train; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
