"""Every chosen cohort model, loaded once: probabilities, decisions and Grad-CAM heatmaps.

:class:`Predictor` is what each Ray Data actor holds (and what the in-process path uses):
the models are built from their checkpoints (``weights_only``; no download), put in eval
mode on the device, and applied to uint8 batches exactly as evaluation applies them during
training (:func:`cxr_ray.data.augment.to_model_input`), so a prediction here equals the
evaluation of the same checkpoint on the same pixels.

**Grad-CAM** (Selvaraju et al. 2017) comes from Captum's ``LayerGradCam`` (the attribution
library of the PyTorch project), not a hand-written one. It is read at the last block of
each of the backbone's stages from output stride 8 on whose map is at least 7×7, and the
maps (each ReLU'd, upsampled bilinearly to the image and scaled to [0, 1] per image) are
averaged, then scaled to [0, 1] again: for MobileNetV1 at 224² ``backbone.features.5``
(28×28), ``.11`` (14×14) and ``.13`` (7×7, the textbook Grad-CAM layer). Below that, fewer
blocks qualify: at 112² ``.5`` and ``.11``, at 64² ``.5`` (8×8); at 48², where the stride-8
map is 6×6, the deepest block of at least 7×7 alone (``.3``, 12×12).
:meth:`Predictor.cam_layer_name` says which. The map is the positive class's (the logit's
gradient).

Why several blocks: no single one localised reliably. On synth's single-finding Mass
images at 224² (seven MobileNetV1 models trained alike but for the seed and augmentation,
67 held-out images each; a peak placed at random lands in the drawn box 3 % of the time)
the peak fell in the box for 0-60 % of the images at the last block, 3-75 % at the last
stride-16 block and 7-61 % at the stride-8 block, each failing on some models (the deep
blocks' units see almost the whole image; without augmentation the stride-8 block was
best, with it the worst); their mean was at 28-82 %, never below 8× chance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_ray import models
from cxr_ray.data import augment
from cxr_ray.predict.select import CohortModel
from cxr_ray.train import checkpoint as ck

#: Smallest map side Grad-CAM is read from when the backbone offers one.
MIN_CAM_SIDE = 7
#: Smallest output stride (input side / map side) of a Grad-CAM layer (module docstring).
MIN_CAM_STRIDE = 8


def load_model(model: CohortModel, device: torch.device,
               data: bytes | None = None) -> models.CxrClassifier:
    """A cohort's classifier from its checkpoint (or that file's bytes), in eval mode on
    ``device``."""
    ckpt = ck.load_checkpoint(model.checkpoint, data)
    cfg = {**ckpt["model"], "weights": None, "pretrained": False}  # the checkpoint has them
    net = models.build_model(models.ModelConfig(**cfg))
    net.load_state_dict(ckpt["model_state"])
    return net.to(device).eval()


def feature_blocks(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The backbone's top-level feature blocks (``backbone.features.N``), else every module."""
    features = getattr(getattr(net, "backbone", None), "features", None)
    if isinstance(features, torch.nn.Sequential):
        return [(f"backbone.features.{n}", m) for n, m in features.named_children()]
    return [(n, m) for n, m in net.named_modules() if n]


def cam_layers(net: torch.nn.Module, size: int
               ) -> list[tuple[str, torch.nn.Module, tuple[int, int]]]:
    """The blocks Grad-CAM is read at for inputs of ``size``: the last block of each stage
    (blocks sharing a map size) from output stride :data:`MIN_CAM_STRIDE` on whose map is
    at least :data:`MIN_CAM_SIDE`; when there is none, the deepest block of at least that
    side, else the largest map; → [(name, module, map size)], shallowest first."""
    shapes: dict[str, tuple[int, int]] = {}
    blocks = feature_blocks(net)

    def record(name: str):
        def hook(_module, _inputs, out) -> None:  # returns None: the output is kept
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                shapes.setdefault(name, (int(out.shape[-2]), int(out.shape[-1])))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in blocks]
    try:
        with torch.no_grad():
            device = next(net.parameters()).device
            net(torch.zeros(1, 1, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
    spatial = [(name, m, shapes[name]) for name, m in blocks if name in shapes]
    if not spatial:
        raise RuntimeError("the model has no 4-D feature map for Grad-CAM")
    big = [s for s in spatial if min(s[2]) >= MIN_CAM_SIDE]
    stage_ends = [s for i, s in enumerate(big) if i + 1 == len(big) or big[i + 1][2] != s[2]]
    coarse = [s for s in stage_ends if size / min(s[2]) >= MIN_CAM_STRIDE]
    if coarse:
        return coarse
    return [big[-1]] if big else [max(spatial, key=lambda s: min(s[2]))]


class Predictor:
    """The chosen models of several cohorts (see the module docstring)."""

    def __init__(self, chosen: dict[str, CohortModel], *, device: str | torch.device = "cpu",
                 threads: int | None = None, blobs: dict[str, bytes] | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.chosen = dict(chosen)
        self.size = next(iter(chosen.values())).image_size
        blobs = blobs or {}
        self.models = {c: load_model(m, self.device, blobs.get(c)) for c, m in chosen.items()}
        self._cam: dict[str, Any] = {}

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S) → the model's float input on the device."""
        return augment.to_model_input(torch.from_numpy(np.ascontiguousarray(pixels))
                                      ).to(self.device)

    @torch.no_grad()
    def probabilities(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """``{cohort: P(positive)}`` for a uint8 batch (N, S, S)."""
        if len(pixels) == 0:
            return {c: np.zeros(0) for c in self.models}
        x = self.inputs(pixels)
        return {c: torch.sigmoid(net(x).float().reshape(-1)).cpu().numpy().astype(np.float64)
                for c, net in self.models.items()}

    def cam_layer_name(self, cohort: str) -> str:
        """Which blocks :meth:`heatmaps` reads for ``cohort`` (and their map sizes)."""
        return " + ".join(f"{name} ({shape[0]}x{shape[1]})"
                          for _, name, shape in self._cam_for(cohort))

    def _cam_for(self, cohort: str) -> list[tuple[Any, str, tuple[int, int]]]:
        if cohort not in self._cam:
            from captum.attr import LayerGradCam

            net = self.models[cohort]
            self._cam[cohort] = [
                (LayerGradCam(lambda x, net=net: net(x).reshape(-1), layer), name, shape)
                for name, layer, shape in cam_layers(net, self.size)]
        return self._cam[cohort]

    def heatmaps(self, pixels: np.ndarray, cohort: str) -> np.ndarray:
        """Grad-CAM of ``cohort``'s positive class: float (N, S, S) in [0, 1]."""
        from captum.attr import LayerAttribution

        def unit(maps: np.ndarray) -> np.ndarray:  # each image's map scaled to [0, 1]
            top = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
            return np.where(top > 0, maps / np.where(top > 0, top, 1.0), 0.0)

        total = np.zeros((len(pixels), self.size, self.size))
        for gradcam, _, _ in self._cam_for(cohort):
            x = self.inputs(pixels).requires_grad_(True)
            with torch.enable_grad():
                attr = gradcam.attribute(x, relu_attributions=True)
            up = LayerAttribution.interpolate(attr, (self.size, self.size),
                                              interpolate_mode="bilinear")
            total += unit(up.detach().float().reshape(len(pixels), self.size, self.size)
                          .cpu().numpy())
        return unit(total)


def write_overlay(path: str | Path, pixels: np.ndarray, heatmap: np.ndarray, *,
                  display: int = 256, alpha: float = 0.45) -> Path:
    """The image (grey) with the heatmap (jet) blended over it, upsampled to ``display``."""
    from matplotlib import colormaps
    from PIL import Image

    side = max(display, pixels.shape[0])
    grey = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR),
                      dtype=np.float32) / 255.0
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize(
        (side, side), Image.BILINEAR), dtype=np.float32).clip(0, 1)
    colour = colormaps["jet"](heat)[..., :3]
    out = (1 - alpha * heat[..., None]) * grey[..., None] + alpha * heat[..., None] * colour
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((out.clip(0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB").save(path)
    return path
