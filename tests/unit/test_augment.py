"""Tests for cxr_ray.data.augment: ranges, per-image independence, determinism, geometry, Ray glue.

Geometry is checked against hand-built expectations (integer shifts, a 90° rotation,
a flip, brightness arithmetic) and, where scipy is installed, against Keras'
own construction: its 3×3 matrices fed to ``scipy.ndimage.affine_transform``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from cxr_ray.data.augment import (
    AugmentBatch,
    AugmentConfig,
    AugmentParams,
    affine_matrices,
    augment,
    augment_by_id,
    counter_uniforms,
    image_keys,
    params_for_ids,
    sample_params,
    to_model_input,
)
from cxr_ray.errors import UserError

GEOMETRY_ONLY = AugmentConfig(brightness=None)


def one(**overrides: float | bool) -> AugmentParams:
    """Identity parameters for one image with some fields overridden."""
    p = AugmentParams.identity(1)
    values = {
        k: torch.tensor([v], dtype=torch.bool if k == "flip" else torch.float64) for k, v in overrides.items()
    }
    return dataclasses.replace(p, **values)


def dot_image(h: int, w: int, r: int, c: int, value: int = 200) -> np.ndarray:
    img = np.zeros((1, h, w), dtype=np.uint8)
    img[0, r, c] = value
    return img


def brightest(x: torch.Tensor) -> tuple[int, int]:
    flat = int(torch.argmax(x[0, 0]))
    return divmod(flat, x.shape[-1])


# --- parameters ---------------------------------------------------------------------


def test_params_within_ranges_and_span_them():
    cfg = AugmentConfig()
    p = params_for_ids(np.arange(20_000), seed=1, epoch=0, cfg=cfg)
    g = sample_params(20_000, torch.Generator().manual_seed(1), cfg)
    for q in (p, g):
        for name, lo, hi in [
            ("angle_deg", -7.0, 7.0),
            ("shear_deg", -0.05, 0.05),
            ("zoom_y", 0.9, 1.1),
            ("zoom_x", 0.9, 1.1),
            ("shift_y", -0.1, 0.1),
            ("shift_x", -0.1, 0.1),
            ("brightness", 0.4, 1.5),
        ]:
            v = getattr(q, name)
            assert v.shape == (20_000,)
            assert lo <= float(v.min()) and float(v.max()) <= hi, name
            # Actually spans the range (uniform: 20k draws leave < 0.5 % at each end).
            assert float(v.min()) < lo + 0.005 * (hi - lo) and float(v.max()) > hi - 0.005 * (hi - lo), name
            assert abs(float(v.mean()) - (lo + hi) / 2) < 0.01 * (hi - lo), name
        assert abs(float(q.flip.float().mean()) - 0.5) < 0.02
        # zoom_y and zoom_x are independent draws (Keras draws two), not one shared scale.
        assert abs(float(torch.corrcoef(torch.stack([q.zoom_y, q.zoom_x]))[0, 1])) < 0.05


def test_counter_uniforms_look_uniform_and_independent():
    u = counter_uniforms(np.arange(50_000), seed=0, epoch=0)
    assert u.shape == (50_000, 8) and u.min() >= 0.0 and u.max() < 1.0
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.all(np.abs(hist / u.size - 0.1) < 0.005)
    corr = np.corrcoef(u.T)
    assert np.all(np.abs(corr - np.eye(8)) < 0.03)
    # Consecutive ids are not correlated either.
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03


def test_disabled_config_gives_identity_params():
    p = sample_params(5, torch.Generator().manual_seed(0), AugmentConfig.none())
    assert torch.all(p.angle_deg == 0) and torch.all(p.zoom_x == 1) and not p.flip.any()
    assert torch.all(p.brightness == 1)


def test_config_validation_and_toml_list():
    assert AugmentConfig.from_dict({"brightness": [0.4, 1.5]}) == AugmentConfig()
    with pytest.raises(UserError, match="unknown augment"):
        AugmentConfig.from_dict({"rotation": 7})
    with pytest.raises(UserError, match="brightness"):
        AugmentConfig(brightness=(1.5, 0.4))
    with pytest.raises(UserError, match="zoom"):
        AugmentConfig(zoom=1.5)


# --- independence and determinism ---------------------------------------------------------


def test_each_image_draws_its_own_params():
    p = params_for_ids(np.arange(32), seed=0, epoch=0, cfg=AugmentConfig())
    for name in ("angle_deg", "zoom_y", "zoom_x", "shift_y", "shift_x", "brightness"):
        assert len(torch.unique(getattr(p, name))) == 32, name
    # And the pixels differ too: the same image repeated 8 times gives 8 different outputs.
    img = np.tile(np.random.default_rng(0).integers(0, 256, (1, 32, 32), dtype=np.uint8), (8, 1, 1))
    out = augment(img, params_for_ids(np.arange(8), seed=0, epoch=0, cfg=AugmentConfig()), AugmentConfig())
    flat = out.reshape(8, -1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


def test_params_do_not_depend_on_batch_neighbours_or_position():
    cfg = AugmentConfig()
    ids = np.array([17, 3, 99, 4, 1000, 5])
    full = params_for_ids(ids, seed=7, epoch=2, cfg=cfg)
    perm = np.array([4, 0, 5, 2, 1, 3])
    shuffled = params_for_ids(ids[perm], seed=7, epoch=2, cfg=cfg)
    alone = params_for_ids(ids[2:3], seed=7, epoch=2, cfg=cfg)
    for f in dataclasses.fields(AugmentParams):
        assert torch.equal(getattr(shuffled, f.name), getattr(full, f.name)[perm])
        assert torch.equal(getattr(alone, f.name), getattr(full, f.name)[2:3])


def test_deterministic_under_seed_epoch_and_ids():
    cfg = AugmentConfig()
    img = np.random.default_rng(0).integers(0, 256, (6, 24, 24), dtype=np.uint8)
    ids = np.array(["00000001_000.png", "00000001_001.png", "a", "b", "c", "d"], dtype=object)

    def run(seed: int, epoch: int) -> torch.Tensor:
        return augment(img, params_for_ids(ids, seed=seed, epoch=epoch, cfg=cfg), cfg)

    assert torch.equal(run(0, 0), run(0, 0))
    assert not torch.allclose(run(0, 0), run(0, 1))  # new epoch, new augmentation
    assert not torch.allclose(run(0, 0), run(1, 0))  # new seed, new augmentation
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = augment(img, sample_params(6, g1, cfg), cfg)
    assert torch.equal(first, augment(img, sample_params(6, g2, cfg), cfg))


def test_augment_by_id_takes_torch_ids_from_the_training_loop():
    cfg = AugmentConfig()
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8))
    ids = torch.tensor([3, 1, 4, 1_000_000])
    expected = augment(img, params_for_ids(ids.numpy(), seed=2, epoch=5, cfg=cfg), cfg)
    assert torch.equal(augment_by_id(img, ids, seed=2, epoch=5, cfg=cfg), expected)


def test_image_keys_are_stable_for_strings_and_exact_for_ints():
    keys = image_keys(np.array(["00000001_000.png", "00000002_000.png"]))
    assert keys.dtype == np.uint64 and keys[0] != keys[1]
    # A fixed value: BLAKE2b, not Python's per-process salted hash().
    assert np.array_equal(keys, image_keys(["00000001_000.png", "00000002_000.png"]))
    digest = hashlib.blake2b(b"x", digest_size=8).digest()
    assert int(image_keys(["x"])[0]) == int.from_bytes(digest, "little")
    assert image_keys(np.array([5, -1])).tolist() == [5, 2**64 - 1]
    with pytest.raises(ValueError):
        image_keys(np.array([1.5]))


# --- evaluation path, dtype, shape ---------------------------------------------------------


def test_eval_path_is_plain_scaling_without_randomness():
    img = np.random.default_rng(0).integers(0, 256, (3, 16, 20), dtype=np.uint8)
    x = to_model_input(img)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 16, 20)
    assert torch.equal(x, torch.from_numpy(img).float().unsqueeze(1) / 255.0)
    assert torch.equal(to_model_input(img), x)
    # Disabled augmentation is exactly the evaluation path.
    p = sample_params(3, torch.Generator().manual_seed(0), AugmentConfig())
    assert torch.equal(augment(img, p, AugmentConfig.none()), x)
    # Identity parameters through the warp reproduce the image (grid hits pixel centres).
    ident = augment(img, AugmentParams.identity(3), GEOMETRY_ONLY)
    assert torch.allclose(ident, x, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 12, 10), (4, 1, 12, 10)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_output_dtype_shape_range(shape, dtype):
    img = (np.random.default_rng(1).random(shape) * 255).astype(dtype)
    out = augment(img, sample_params(4, torch.Generator().manual_seed(0), AugmentConfig()), AugmentConfig())
    assert out.dtype == torch.float32 and out.shape == (4, 1, 12, 10)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


# --- geometry ----------------------------------------------------------------------------


def test_pure_shift_moves_a_dot_by_whole_pixels():
    h, w = 20, 30
    img = dot_image(h, w, 10, 12)
    # Keras: input = output + t, so a positive shift moves content up / left.
    out = augment(img, one(shift_y=5 / h), GEOMETRY_ONLY)
    assert brightest(out) == (5, 12)
    assert out[0, 0, 5, 12] == pytest.approx(200 / 255, abs=1e-5)
    assert float(out.sum()) == pytest.approx(200 / 255, abs=1e-4)  # an exact move, no blur
    out = augment(img, one(shift_x=-6 / w), GEOMETRY_ONLY)
    assert brightest(out) == (10, 18)
    assert float(out.sum()) == pytest.approx(200 / 255, abs=1e-4)


def test_pure_rotation_by_90_degrees_is_a_permutation():
    n = 21  # odd: the centre is a pixel
    img = np.random.default_rng(0).integers(0, 256, (1, n, n), dtype=np.uint8)
    out = augment(img, one(angle_deg=90.0), GEOMETRY_ONLY)[0, 0]
    # Keras' R = [[cos, -sin], [sin, cos]] in (row, col), output → input:
    # out[r, c] = in[c0 - (c - c0), c0 + (r - c0)] = in[n-1-c, r], i.e. np.rot90(in, k=-1).
    expected = torch.from_numpy(np.rot90(img[0], k=-1).copy()).float() / 255
    assert torch.allclose(out, expected, atol=1e-5)
    # A dot above the centre ends up right of it.
    dot = augment(dot_image(n, n, 10 - 5, 10), one(angle_deg=90.0), GEOMETRY_ONLY)
    assert brightest(dot) == (10, 15)


def test_small_rotation_moves_a_dot_along_the_circle():
    n = 41
    c0 = (n - 1) / 2
    img = dot_image(n, n, 20, 35)  # 15 px right of the centre
    theta = 7.0
    out = augment(img, one(angle_deg=theta), GEOMETRY_ONLY)[0, 0].double()
    rr, cc = torch.meshgrid(torch.arange(n).double(), torch.arange(n).double(), indexing="ij")
    mass = out.sum()
    r_bar, c_bar = float((out * rr).sum() / mass), float((out * cc).sum() / mass)
    # Output point p with R·(p - c) = (0, 15): p - c = R⁻¹ (0, 15) = (15 sin θ, 15 cos θ).
    t = np.deg2rad(theta)
    assert r_bar == pytest.approx(c0 + 15 * np.sin(t), abs=0.15)
    assert c_bar == pytest.approx(c0 + 15 * np.cos(t), abs=0.15)


def test_zoom_above_one_zooms_out():
    n = 41
    img = np.zeros((1, n, n), dtype=np.uint8)
    img[0, 10:31, 10:31] = 255  # a 21×21 bright square in the middle
    area = float(augment(img, AugmentParams.identity(1), GEOMETRY_ONLY).sum())
    out = augment(img, one(zoom_y=1.1, zoom_x=1.2), GEOMETRY_ONLY)
    assert float(out.sum()) == pytest.approx(area / (1.1 * 1.2), rel=0.03)  # smaller content
    out = augment(img, one(zoom_y=0.9, zoom_x=0.9), GEOMETRY_ONLY)
    assert float(out.sum()) == pytest.approx(area / 0.81, rel=0.03)  # larger content


def test_flip_mirrors_columns_exactly():
    img = np.random.default_rng(0).integers(0, 256, (2, 9, 14), dtype=np.uint8)
    p = dataclasses.replace(AugmentParams.identity(2), flip=torch.tensor([True, False]))
    out = augment(img, p, GEOMETRY_ONLY)
    assert torch.allclose(out[0, 0], torch.from_numpy(img[0, :, ::-1].copy()).float() / 255, atol=1e-5)
    assert torch.allclose(out[1, 0], torch.from_numpy(img[1]).float() / 255, atol=1e-5)


def test_flip_is_applied_after_the_warp_as_in_keras():
    img = dot_image(20, 30, 10, 12)
    out = augment(img, one(shift_x=-6 / 30, flip=True), GEOMETRY_ONLY)
    # Warp first (dot to column 18), then mirror: 29 - 18 = 11.
    assert brightest(out) == (10, 11)


def test_brightness_multiplies_and_clips():
    img = np.array([[[0, 100, 200, 50]]], dtype=np.uint8)
    no_stretch = AugmentConfig(brightness=(0.4, 1.5), brightness_stretch=False)
    out = augment(img, one(brightness=1.5), no_stretch)[0, 0, 0]
    assert out.tolist() == pytest.approx([0, 150 / 255, 1.0, 75 / 255], abs=1e-6)
    out = augment(img, one(brightness=0.4), no_stretch)[0, 0, 0]
    assert out.tolist() == pytest.approx([0, 40 / 255, 80 / 255, 20 / 255], abs=1e-6)
    # Keras' default first stretches to [0, 255] (200 → 255, 100 → 127.5), then multiplies:
    # 127.5 × 1.5 = 191.25 → 0.75.
    out = augment(img, one(brightness=1.5), AugmentConfig())[0, 0, 0]
    assert out.tolist() == pytest.approx([0, 0.75, 1.0, 0.375], abs=1e-6)
    # A constant image becomes 0 under Keras' stretch (x - min == 0).
    flat = np.full((1, 4, 4), 90, dtype=np.uint8)
    assert float(augment(flat, one(brightness=1.2), AugmentConfig()).abs().max()) == 0.0


def test_affine_matrices_shape_and_identity():
    theta = affine_matrices(AugmentParams.identity(3), 10, 20)
    assert theta.shape == (3, 2, 3) and theta.dtype == torch.float32
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))


def keras_reference(x: np.ndarray, theta: float, tx: float, ty: float, shear: float, zx: float, zy: float):
    """Keras' apply_affine_transform for one (H, W) image: its matrices, scipy's resampler."""
    ndimage = pytest.importorskip("scipy.ndimage")
    t, s = np.deg2rad(theta), np.deg2rad(shear)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shr = np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    h, w = x.shape
    o_x, o_y = h / 2 - 0.5, w / 2 - 0.5
    m = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]]) @ rot @ shift @ shr @ zoom
    m = m @ np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return ndimage.affine_transform(x.astype(np.float64), m[:2, :2], m[:2, 2], order=1, mode="nearest")


def test_matches_keras_construction_with_scipy():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(3)
    h, w = 48, 40  # not square: catches a swapped axis
    img = rng.integers(0, 256, (6, h, w), dtype=np.uint8)
    p = sample_params(6, torch.Generator().manual_seed(3), AugmentConfig())
    # Exaggerate rotation and shear so that an ordering or sign error cannot hide.
    p = dataclasses.replace(
        p, angle_deg=p.angle_deg * 4, shear_deg=p.shear_deg * 300, flip=torch.zeros(6, dtype=torch.bool)
    )
    out = augment(img, p, GEOMETRY_ONLY)[:, 0].double().numpy() * 255
    for i in range(6):
        # Keras' tx is the row (height) shift in pixels, ty the column shift; zx scales rows.
        ref = keras_reference(
            img[i],
            float(p.angle_deg[i]),
            float(p.shift_y[i]) * h,
            float(p.shift_x[i]) * w,
            float(p.shear_deg[i]),
            float(p.zoom_y[i]),
            float(p.zoom_x[i]),
        )
        assert np.abs(out[i] - ref).max() < 0.01, i


# --- Ray Data batch function -----------------------------------------------------------


def test_augment_batch_on_a_numpy_dict():
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (5, 16, 16), dtype=np.uint8),
        "image_id": np.array([f"{i:08d}_000.png" for i in range(5)], dtype=object),
        "label": np.arange(5, dtype=np.float32),
    }
    fn = AugmentBatch(AugmentConfig(), seed=0, epoch=3)
    out = fn(batch)
    assert set(out) == set(batch)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (5, 16, 16)
    assert np.array_equal(out["label"], batch["label"]) and out["image_id"] is batch["image_id"]
    assert not np.array_equal(out["image"], batch["image"])
    # Equals the torch path for the same (seed, epoch, ids), rounded to uint8.
    cfg = AugmentConfig()
    ref = augment(batch["image"], params_for_ids(batch["image_id"], seed=0, epoch=3, cfg=cfg), cfg)
    assert np.array_equal(out["image"], (ref[:, 0] * 255).round().to(torch.uint8).numpy())
    # Order independent: a batch split in two, in the other order, gives the same rows.
    halves = [{k: v[sl] for k, v in batch.items()} for sl in (slice(3, 5), slice(0, 3))]
    parts = [fn(b)["image"] for b in halves]
    assert np.array_equal(np.concatenate([parts[1], parts[0]]), out["image"])
    # Another epoch: another augmentation; float output is model-ready.
    assert not np.array_equal(AugmentBatch(cfg, seed=0, epoch=4)(batch)["image"], out["image"])
    f32 = AugmentBatch(cfg, seed=0, epoch=3, output_dtype="float32")(batch)["image"]
    assert f32.dtype == np.float32 and f32.shape == (5, 1, 16, 16)
    assert np.allclose(f32, ref.numpy(), atol=1e-6)
    # seed=None: fresh entropy per call.
    free = AugmentBatch(cfg, seed=None)
    assert not np.array_equal(free(batch)["image"], free(batch)["image"])
    with pytest.raises(KeyError, match="image_id"):
        fn({"image": batch["image"]})


def test_augment_batch_disabled_equals_eval_path():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    batch = {"image": pixels, "image_id": np.arange(3)}
    out = AugmentBatch(AugmentConfig.none(), seed=0)(batch)
    assert np.array_equal(out["image"], batch["image"])
