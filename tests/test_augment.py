"""Augmentations: shapes, seeds, and that each one does what its name says."""

import numpy as np
import pytest

from moola.augmentation import augment_windows, jitter, magnitude_scale, time_warp


@pytest.fixture
def windows():
    t = np.linspace(0, 4 * np.pi, 105)
    base = 0.5 + 0.4 * np.sin(t)
    w = np.stack([base, base + 0.05, base - 0.05, base + 0.01], axis=-1)
    rng = np.random.default_rng(0)
    return (w[None] + rng.normal(0, 0.01, (32, 105, 4))).astype(np.float32)


def test_time_warp_really_warps_but_keeps_endpoints_and_range(windows):
    warped = time_warp(windows, 0.12, 4, np.random.default_rng(1))
    assert warped.shape == windows.shape and warped.dtype == np.float32
    assert np.allclose(warped[:, 0], windows[:, 0]) and np.allclose(warped[:, -1], windows[:, -1], atol=1e-5)
    moved = np.abs(warped - windows).mean(axis=(1, 2))
    assert np.all(moved > 1e-3)  # every window is warped
    assert warped.min() >= windows.min() - 1e-6 and warped.max() <= windows.max() + 1e-6  # interpolation only
    # The peaks move in time: the position of the maximum changes for most windows.
    assert np.mean(warped[..., 3].argmax(1) != windows[..., 3].argmax(1)) > 0.5
    stronger = time_warp(windows, 0.3, 4, np.random.default_rng(1))
    assert np.abs(stronger - windows).mean() > np.abs(warped - windows).mean()


def test_time_warp_with_zero_sigma_is_identity(windows):
    assert np.array_equal(time_warp(windows, 0.0, 4, np.random.default_rng(1)), windows)


def test_jitter_and_scaling_statistics(windows):
    noise = jitter(windows, 0.01, np.random.default_rng(2)) - windows
    assert abs(noise.std() - 0.01) < 1e-3 and abs(noise.mean()) < 1e-3
    scaled = magnitude_scale(windows, 0.05, np.random.default_rng(3))
    factors = (scaled - 0.5)[:, :, 0] / (windows - 0.5)[:, :, 0]
    assert np.allclose(factors, factors[:, :1], rtol=1e-3, atol=1e-3)  # one factor per window
    assert np.all(scaled[..., 2] <= scaled[..., 1])  # low stays below high


def test_augment_windows_shape_order_and_seed(windows):
    out = augment_windows(windows, 4, 0.12, 0.01, 0.05, 4, seed=5)
    assert out.shape == (32 * 5, 105, 4) and out.dtype == np.float32
    assert np.array_equal(out[:32], windows)  # originals first
    assert np.array_equal(out, augment_windows(windows, 4, 0.12, 0.01, 0.05, 4, seed=5))
    assert not np.array_equal(out, augment_windows(windows, 4, 0.12, 0.01, 0.05, 4, seed=6))
    # Copy k does not depend on the multiplier: 3x is a prefix of 4x.
    assert np.array_equal(augment_windows(windows, 3, 0.12, 0.01, 0.05, 4, seed=5), out[: 32 * 4])
