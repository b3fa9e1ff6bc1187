"""Per-image, Keras-equivalent training augmentation on whole batches (docs/study.md §3).

The study trained with Keras::

    ImageDataGenerator(shear_range=0.05, zoom_range=0.1, rotation_range=7,
                       width_shift_range=0.1, height_shift_range=0.1,
                       brightness_range=[0.4, 1.5], horizontal_flip=True)

This module reproduces that generator on batches: every image draws its own
parameters, and the geometric part of a whole batch is one sampling grid (what
``F.affine_grid`` computes from a stack of per-image 2×3 matrices) and one
``F.grid_sample`` call, on any device.
Evaluation images are never augmented; they go through :func:`to_model_input`,
the same dtype and scaling as the training path, minus the random part.

Keras semantics reproduced (keras_preprocessing ``get_random_transform``,
``apply_affine_transform``, ``apply_transform``, ``apply_brightness_shift``):

* rotation θ ~ U(-7°, 7°); shear ~ U(-0.05, 0.05) **degrees** (Keras applies
  ``deg2rad`` to the shear value, so it is tiny; reproduced anyway);
* zoom: two independent draws from U(0.9, 1.1), one per axis.  Keras' matrix
  maps *output* to *input* coordinates, so a zoom > 1 samples a larger region:
  the content shrinks (zoom **out**), a zoom < 1 zooms in;
* shifts ~ U(-0.1, 0.1) × the image height (rows) and width (columns), in
  pixels;
* order of composition: Keras multiplies homogeneous 3×3 matrices
  ``R · T · Sh · Z`` (rotation, shift, shear, zoom) and conjugates them with a
  move to the image centre c = ((H-1)/2, (W-1)/2).  In Keras' (row, col) pixel
  coordinates, output → input, that is::

      p_in - c = R · Sh · Z · (p_out - c) + R · t

  with ``R = [[cos θ, -sin θ], [sin θ, cos θ]]``, ``Sh = [[1, -sin s], [0, cos s]]``,
  ``Z = diag(zoom_y, zoom_x)`` and ``t = (shift_y·H, shift_x·W)`` (Keras' ``tx``
  is the *row* shift, ``ty`` the column shift; its ``zx`` scales rows).  Since
  input = output + t, a positive shift moves the content up / left;
* bilinear interpolation (Keras ``order=1``) and ``fill_mode='nearest'``,
  which is ``grid_sample(padding_mode="border")`` here;
* the horizontal flip (p = 0.5) comes *after* the affine warp in Keras; a
  mirror of the output grid is exact, so it is folded into the same matrix;
* brightness last: Keras converts the image with ``array_to_img(scale=True)``,
  which stretches it to min 0 / max 255, then ``PIL.ImageEnhance.Brightness``
  multiplies by a factor ~ U(0.4, 1.5) and clips to [0, 255].  The stretch is
  reproduced (``AugmentConfig.brightness_stretch``); PIL's rounding to uint8
  happens only if the caller asks for uint8 output (:class:`AugmentBatch`).

Deliberate deviation: the centre is the exact pixel centre (H-1)/2, as in
current keras_preprocessing (``x / 2 - 0.5``); some older releases used
``x / 2 + 0.5``, a one-pixel offset that is a bug and is not reproduced.

From Keras pixel space to ``affine_grid``: with ``align_corners=False`` the
normalised coordinate of pixel index ``i`` on an axis of size ``n`` is
``(2i + 1)/n - 1``, so a centred pixel offset is ``D · normalised`` with
``D = diag(H/2, W/2)`` in (row, col) order.  The normalised output → input map
is therefore ``D⁻¹ A F D`` plus ``D⁻¹ R t`` (A = R·Sh·Z, F = the flip), and
``affine_grid`` wants it in (x, y) = (col, row) order, so rows and columns of
the 2×2 block and the two offsets are swapped (see :func:`affine_matrices`).

Determinism.  Two ways to draw parameters:

* :func:`sample_params` from a ``torch.Generator`` — reproducible for a given
  generator state and batch; fine for a single process;
* :func:`params_for_ids` — counter-based: every image's parameters are a hash
  of ``(seed, epoch, image id)`` (SplitMix64, vectorised in numpy).  An image
  gets the same parameters whatever batch it lands in, at whatever position, in
  whatever order Ray Data delivers batches and on whichever worker: "deterministic
  under a seed" means *deterministic given (seed, epoch, image id)*.  A new
  epoch gives new parameters.  This is what :class:`AugmentBatch` uses.

Where it runs (numbers: ``bench/augment.py`` → bench/RESULTS.md, a busy 2-core CPU):
one CPU thread augments about 900–1,200 images/s at 224² and 6,000–12,000 at 64²,
3–6× Keras' per-image scipy loop and 200–700× the rate at which MobileNetV1 trains
on the same CPU.  The default is the training worker, right after the uint8 batch
reaches its device (:func:`augment_by_id`): the worker knows its epoch, so the
parameters change every epoch and stay reproducible without rebuilding Ray
datasets; the host → device copy stays uint8; on a GPU the warp is one
``grid_sample`` per batch (expected to be negligible; no GPU was measured), on a
CPU it is well under 1 % of a step.  :class:`AugmentBatch` in Ray Data is the
alternative when spare CPU cores exist and the device is saturated: a local Ray
Data pipeline did ~700 images/s at 224² end to end on 2 busy cores, so budget
one Ray CPU per few hundred images/s at 224².  Use one intra-op thread per
process (Ray tasks get ``OMP_NUM_THREADS=1``): on the busy machine two threads
were 1.5–20× *slower* than one.

Scaling: the model sees float32 ``(N, 1, H, W)`` in ``[0, 1]`` (pixel / 255,
Keras' ``rescale=1/255`` applied after the random transform, as Keras does).
Any further normalisation belongs to the model, so that train and evaluation
can never disagree here.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cxr_ray.errors import UserError

__all__ = [
    "AugmentBatch",
    "AugmentConfig",
    "AugmentParams",
    "affine_matrices",
    "augment",
    "augment_by_id",
    "counter_uniforms",
    "image_keys",
    "params_for_ids",
    "params_from_uniforms",
    "sample_params",
    "to_model_input",
]

logger = logging.getLogger(__name__)

# One uniform per parameter, in this column order, for every image.  The order is
# part of the reproducibility contract of `params_for_ids`: do not reorder.
_UNIFORM_COLUMNS = ("angle", "shear", "zoom_y", "zoom_x", "shift_y", "shift_x", "flip", "brightness")
N_UNIFORMS = len(_UNIFORM_COLUMNS)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation settings; the defaults are the study's Keras ``ImageDataGenerator``."""

    enabled: bool = True
    """False: no randomness at all; :func:`augment` then equals :func:`to_model_input`."""

    rotation_deg: float = 7.0
    """Keras ``rotation_range``: angle ~ U(-r, r) degrees."""

    shear_deg: float = 0.05
    """Keras ``shear_range``: shear angle ~ U(-s, s), in **degrees** (Keras' unit)."""

    zoom: float = 0.1
    """Keras ``zoom_range`` as one float z: zoom_y, zoom_x ~ U(1-z, 1+z) independently; >1 zooms out."""

    shift_y: float = 0.1
    """Keras ``height_shift_range``: vertical shift ~ U(-f, f) × image height, in pixels."""

    shift_x: float = 0.1
    """Keras ``width_shift_range``: horizontal shift ~ U(-f, f) × image width, in pixels."""

    horizontal_flip: bool = True
    """Keras ``horizontal_flip``: mirror left-right with probability 0.5."""

    brightness: tuple[float, float] | None = (0.4, 1.5)
    """Keras ``brightness_range``: pixel values × U(lo, hi), clipped to [0, 255]; None: off."""

    brightness_stretch: bool = True
    """Reproduce Keras' min-max stretch to [0, 255] (``array_to_img(scale=True)``) before the
    brightness factor.  Keras does it whenever ``brightness_range`` is set."""

    def __post_init__(self) -> None:
        # Recipes come from TOML, where a pair is a list: normalise it to a tuple so the
        # config stays hashable and compares equal to the default.
        if self.brightness is not None:
            lo_hi = tuple(float(v) for v in self.brightness)
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1]:
                raise UserError(
                    f"augment.brightness must be [lo, hi] with 0 <= lo <= hi, got {self.brightness!r}"
                )
            object.__setattr__(self, "brightness", lo_hi)
        for name in ("rotation_deg", "shear_deg", "shift_y", "shift_x"):
            if getattr(self, name) < 0:
                raise UserError(f"augment.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.zoom < 1.0:
            raise UserError(f"augment.zoom must be in [0, 1), got {self.zoom!r}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation (the evaluation setting)."""
        return cls(enabled=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentConfig:
        """Build from a recipe section, naming any unknown key instead of ignoring it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown augment setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class AugmentParams:
    """Per-image parameters, each a tensor of shape (n,) (float64; ``flip`` bool).

    Shifts are stored as fractions of the image size so that the same parameters
    can be applied at any resolution; :func:`affine_matrices` turns them into pixels.
    """

    angle_deg: torch.Tensor
    shear_deg: torch.Tensor
    zoom_y: torch.Tensor
    zoom_x: torch.Tensor
    shift_y: torch.Tensor
    """Vertical shift as a fraction of H (Keras ``tx``; positive moves content up)."""
    shift_x: torch.Tensor
    """Horizontal shift as a fraction of W (Keras ``ty``; positive moves content left)."""
    flip: torch.Tensor
    brightness: torch.Tensor

    def __len__(self) -> int:
        return int(self.angle_deg.shape[0])

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def identity(cls, n: int) -> AugmentParams:
        """Parameters that change nothing (used when augmentation is disabled)."""
        zeros = torch.zeros(n, dtype=torch.float64)
        ones = torch.ones(n, dtype=torch.float64)
        return cls(zeros, zeros, ones, ones, zeros, zeros, torch.zeros(n, dtype=torch.bool), ones)


def params_from_uniforms(u: torch.Tensor, cfg: AugmentConfig) -> AugmentParams:
    """Map uniforms in [0, 1) of shape (n, 8) to parameters, column order ``_UNIFORM_COLUMNS``.

    Each range is ``lo + (hi - lo) * u``, as ``np.random.uniform`` does in Keras.
    """
    if u.ndim != 2 or u.shape[1] != N_UNIFORMS:
        raise ValueError(f"expected uniforms of shape (n, {N_UNIFORMS}), got {tuple(u.shape)}")
    n = u.shape[0]
    if not cfg.enabled:
        return AugmentParams.identity(n)
    u = u.to(torch.float64)

    def sym(col: int, r: float) -> torch.Tensor:
        return (2.0 * u[:, col] - 1.0) * r

    b_lo, b_hi = cfg.brightness if cfg.brightness is not None else (1.0, 1.0)
    return AugmentParams(
        angle_deg=sym(0, cfg.rotation_deg),
        shear_deg=sym(1, cfg.shear_deg),
        zoom_y=1.0 + sym(2, cfg.zoom),
        zoom_x=1.0 + sym(3, cfg.zoom),
        shift_y=sym(4, cfg.shift_y),
        shift_x=sym(5, cfg.shift_x),
        flip=(u[:, 6] < 0.5) & cfg.horizontal_flip,
        brightness=b_lo + (b_hi - b_lo) * u[:, 7],
    )


def sample_params(n: int, generator: torch.Generator, cfg: AugmentConfig) -> AugmentParams:
    """Draw parameters for ``n`` images from ``generator`` (one independent row per image)."""
    u = torch.rand((n, N_UNIFORMS), generator=generator, dtype=torch.float64)
    return params_from_uniforms(u, cfg)


# ---------------------------------------------------------------------------------------
# Counter-based randomness: uniforms as a pure function of (seed, epoch, image id).

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def image_keys(ids: np.ndarray | torch.Tensor | list[Any]) -> np.ndarray:
    """64-bit keys for image ids: integers as they are, strings by a stable hash.

    Python's ``hash()`` is salted per process, so strings use BLAKE2b (a short
    Python loop, about a microsecond per id, negligible next to the warp).
    """
    arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"image ids must be one-dimensional, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64).view(np.uint64)
    if np.issubdtype(arr.dtype, np.floating):
        raise ValueError("image ids must be integers or strings, not floats")
    keys = [
        int.from_bytes(
            hashlib.blake2b(v if isinstance(v, bytes) else str(v).encode(), digest_size=8).digest(),
            "little",
        )
        for v in arr.tolist()
    ]
    return np.asarray(keys, dtype=np.uint64)


def counter_uniforms(
    ids: np.ndarray | torch.Tensor | list[Any], seed: int, epoch: int, k: int = N_UNIFORMS
) -> np.ndarray:
    """Uniforms in [0, 1) of shape (len(ids), k), each a pure function of (seed, epoch, id, column)."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.array([epoch & _MASK64], dtype=np.uint64))
    per_image = _splitmix64(image_keys(ids) ^ key)  # (n,)
    with np.errstate(over="ignore"):
        counters = per_image[:, None] + np.arange(1, k + 1, dtype=np.uint64)[None, :] * _GOLDEN
    bits = _splitmix64(counters) >> np.uint64(11)  # top 53 bits: exactly representable in float64
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def params_for_ids(
    ids: np.ndarray | torch.Tensor | list[Any], *, seed: int, epoch: int, cfg: AugmentConfig
) -> AugmentParams:
    """Parameters for the given images, deterministic in (seed, epoch, image id), order independent."""
    u = torch.from_numpy(counter_uniforms(ids, seed, epoch))
    return params_from_uniforms(u, cfg)


# ---------------------------------------------------------------------------------------
# Geometry and pixels.


def affine_matrices(params: AugmentParams, height: int, width: int) -> torch.Tensor:
    """Per-image ``affine_grid`` matrices (n, 2, 3), float32, for ``align_corners=False``.

    They map normalised *output* (x, y) to normalised *input* (x, y), the Keras
    transform ``R · Shift · Shear · Zoom`` about the centre, followed by the
    optional left-right flip of the output (see the module docstring).
    """
    p = params
    n = len(p)
    theta = torch.deg2rad(p.angle_deg.to(torch.float64))
    shear = torch.deg2rad(p.shear_deg.to(torch.float64))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros, ones = torch.zeros_like(cos), torch.ones_like(cos)

    def mat(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)  # (n, 2, 2)

    # All 2×2 blocks in Keras' (row, col) pixel coordinates, output → input.
    rot = mat(cos, -sin, sin, cos)
    shr = mat(ones, -torch.sin(shear), zeros, torch.cos(shear))
    zoom = mat(p.zoom_y.to(torch.float64), zeros, zeros, p.zoom_x.to(torch.float64))
    flip = mat(ones, zeros, zeros, torch.where(p.flip, -ones, ones))
    linear = rot @ shr @ zoom @ flip
    shift_px = torch.stack([p.shift_y.to(torch.float64) * height, p.shift_x.to(torch.float64) * width], -1)
    offset = (rot @ shift_px.unsqueeze(-1)).squeeze(-1)  # the shift sits after R in R·T·Sh·Z

    # Centred pixels = D · normalised, D = diag(H/2, W/2) (align_corners=False).
    d = torch.tensor([height / 2.0, width / 2.0], dtype=torch.float64, device=linear.device)
    linear_n = linear * d[None, None, :] / d[None, :, None]  # D⁻¹ · linear · D
    offset_n = offset / d[None, :]
    # (row, col) → (x, y) = (col, row): swap both axes of the block and the offsets.
    out = torch.empty((n, 2, 3), dtype=torch.float64, device=linear.device)
    out[:, :, :2] = linear_n.flip(1).flip(2)
    out[:, :, 2] = offset_n.flip(1)
    return out.to(torch.float32)


def _as_float_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8/float pixels in [0, 255], (N, H, W) or (N, C, H, W) → float32 (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    return x.to(torch.float32)


def to_model_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The evaluation path: pixels in [0, 255] → float32 (N, C, H, W) in [0, 1], no randomness.

    Training batches go through the same scaling inside :func:`augment` (and the uint8
    output of :class:`AugmentBatch` goes through this function), so train and test
    can never disagree on normalisation.
    """
    return _as_float_nchw(images) / 255.0


def augment(images: torch.Tensor | np.ndarray, params: AugmentParams, cfg: AugmentConfig) -> torch.Tensor:
    """Augment a batch, one parameter set per image, on the device of ``images``.

    Args:
        images: pixels in [0, 255]: uint8 (N, H, W) / (N, 1, H, W), or float (N, 1, H, W).
        params: one row per image (from :func:`sample_params` or :func:`params_for_ids`).
        cfg: the settings the parameters were drawn with (brightness on/off, stretch).

    Returns:
        float32 (N, C, H, W) in [0, 1], the same scaling as :func:`to_model_input`.
    """
    x = _as_float_nchw(images)
    if not cfg.enabled:
        return x / 255.0
    n, _, h, w = x.shape
    if len(params) != n:
        raise ValueError(f"{len(params)} parameter rows for {n} images")
    params = params.to(x.device)
    theta = affine_matrices(params, h, w).to(x.device)
    # One grid and one sample for the whole batch: per-image matrices, no Python loop.
    grid = _sampling_grid(theta, h, w)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.brightness is None:
        return x.mul_(1.0 / 255.0)
    factor = params.brightness.to(torch.float32).view(n, 1, 1, 1)
    if cfg.brightness_stretch:
        # Keras' array_to_img(scale=True): x -= min; x /= max (if max != 0); x *= 255.  The
        # stretch, the factor, and our /255 are one multiply; a constant image has
        # x - min == 0 everywhere and stays 0, as in Keras.
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
        x.sub_(lo).mul_(factor / span.clamp_min(1e-12))
    else:
        x.mul_(factor / 255.0)
    # Keras (PIL) clips the brightened image to [0, 255], i.e. [0, 1] here.
    return x.clamp_(0.0, 1.0)


def _sampling_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, ·, h, w), align_corners=False)``, computed by broadcasting.

    Same values (to float32 rounding); about 2× faster than ``affine_grid`` on CPU,
    whose batched matmul over a (h·w, 3) base grid is the slow part.
    """
    xs = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    a = theta[:, None, None, :, 0]  # (n, 1, 1, 2): coefficient of x for (x_in, y_in)
    b = theta[:, None, None, :, 1]
    c = theta[:, None, None, :, 2]
    return xs[None, None, :, None] * a + (ys[None, :, None, None] * b + c)  # (n, h, w, 2)


def augment_by_id(
    images: torch.Tensor | np.ndarray,
    ids: np.ndarray | torch.Tensor | list[Any],
    *,
    seed: int,
    epoch: int,
    cfg: AugmentConfig,
) -> torch.Tensor:
    """The training worker's one call: :func:`params_for_ids` + :func:`augment` on ``images``' device.

    ``images`` is the uint8 batch as stored (e.g. from ``iter_torch_batches``, already on
    the GPU); ``ids`` its image ids (an integer column converts to torch; strings stay numpy).
    """
    return augment(images, params_for_ids(ids, seed=seed, epoch=epoch, cfg=cfg), cfg)


# ---------------------------------------------------------------------------------------
# Ray Data glue: a `map_batches` callable on a dict of numpy arrays.


class AugmentBatch:
    """``Dataset.map_batches`` callable: augments the pixel column of a numpy batch.

    Usage (Ray-specific line)::

        train_ds = train_ds.map_batches(AugmentBatch(cfg, seed=0, epoch=epoch), batch_format="numpy")

    Parameters come from :func:`params_for_ids` on the id column, so the result is
    deterministic in (seed, epoch, image id) however Ray Data batches, orders or
    distributes the rows.  A Ray dataset re-executes its plan each epoch with the
    *same* callable, so a fixed ``epoch`` gives the same augmentation every epoch:
    build the augmented dataset per epoch with the epoch number, or augment on the
    training worker (which knows its epoch) with ``params_for_ids`` + ``augment``.
    ``seed=None`` draws fresh OS entropy on every call instead: different every
    epoch without rebuilding, but not reproducible.

    Output: ``output_dtype="uint8"`` (default) writes the augmented pixels back in
    the input's layout, rounded to uint8 as Keras' PIL round trip does; it keeps the
    object store traffic 4× smaller than float32, and the consumer turns it into
    model input with :func:`to_model_input`, exactly like the evaluation images.
    ``"float32"`` writes model-ready (N, 1, H, W) values in [0, 1].
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        *,
        seed: int | None,
        epoch: int = 0,
        image_column: str = "image",
        id_column: str = "image_id",
        output_dtype: Literal["uint8", "float32"] = "uint8",
    ) -> None:
        if output_dtype not in ("uint8", "float32"):
            raise ValueError(f"output_dtype must be 'uint8' or 'float32', got {output_dtype!r}")
        self.cfg = cfg
        self.seed = seed
        self.epoch = epoch
        self.image_column = image_column
        self.id_column = id_column
        self.output_dtype = output_dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in (self.image_column, self.id_column):
            if col not in batch:
                raise KeyError(f"AugmentBatch needs column {col!r}; the batch has {sorted(batch)}")
        pixels = batch[self.image_column]
        if pixels.dtype == object:  # ragged tensor column: rows are equally sized arrays here
            pixels = np.stack(list(pixels))
        ids = batch[self.id_column]
        if self.seed is None:
            seed = int.from_bytes(np.random.default_rng().bytes(8), "little")
            params = params_for_ids(ids, seed=seed, epoch=0, cfg=self.cfg)
        else:
            params = params_for_ids(ids, seed=self.seed, epoch=self.epoch, cfg=self.cfg)
        with torch.no_grad():
            out = augment(pixels, params, self.cfg)
        result = dict(batch)
        if self.output_dtype == "float32":
            result[self.image_column] = out.numpy()
        else:
            quantised = out.mul_(255.0).round_().to(torch.uint8).numpy()
            result[self.image_column] = quantised.reshape(pixels.shape)
        return result
