"""Augmentations of normalised windows, vectorised over the whole array (no Python loop per window).

Each function takes windows (n, length, features) and a numpy Generator and returns a new float32 array.
"""

from __future__ import annotations

import numpy as np


def time_warp(windows: np.ndarray, sigma: float, knots: int, rng: np.random.Generator) -> np.ndarray:
    """Smoothly speed time up and slow it down: a random positive speed curve through `knots` interior points
    (each ~ N(1, sigma)), integrated into a monotone map of [0, length - 1] onto itself, then the series is
    resampled by linear interpolation at the warped positions. sigma = 0 returns the input unchanged."""
    n, length, features = windows.shape
    if sigma == 0 or n == 0:
        return windows.astype(np.float32, copy=True)
    anchor_x = np.linspace(0.0, length - 1, knots + 2)
    speed_at_knots = np.clip(rng.normal(1.0, sigma, size=(n, knots + 2)), 0.05, None)
    # Piecewise-linear interpolation of the knots onto every step, as one matrix product for all windows.
    steps = np.arange(length, dtype=np.float64)
    weights = np.stack([np.interp(steps, anchor_x, np.eye(knots + 2)[k]) for k in range(knots + 2)], axis=1)
    speed = speed_at_knots @ weights.T  # (n, length)
    position = np.cumsum(speed, axis=1) - speed[:, :1]
    position *= (length - 1) / position[:, -1:]  # the warped clock still runs from the first to the last bar
    left = np.clip(np.floor(position).astype(np.int64), 0, length - 2)
    frac = (position - left)[..., None]
    rows = np.arange(n)[:, None]
    warped = windows[rows, left] * (1.0 - frac) + windows[rows, left + 1] * frac
    return warped.astype(np.float32)


def jitter(windows: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add independent Gaussian noise to every value."""
    return (windows + rng.normal(0.0, sigma, size=windows.shape)).astype(np.float32)


def magnitude_scale(windows: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Multiply each window by one factor ~ N(1, sigma), around the window's middle (0.5 in normalised units),
    so that the move gets larger or smaller while the OHLC relations hold."""
    factor = rng.normal(1.0, sigma, size=(len(windows), 1, 1))
    return ((windows - 0.5) * factor + 0.5).astype(np.float32)


def augment_windows(
    windows: np.ndarray,
    multiplier: int,
    time_warp_sigma: float,
    jitter_sigma: float,
    scaling_sigma: float,
    knots: int,
    seed: int,
) -> np.ndarray:
    """The originals followed by `multiplier` augmented copies (time warp, then scaling, then jitter), float32.

    Copy k draws from its own generator (seed, k), so a copy does not depend on how many others are made.
    """
    n, length, features = windows.shape
    out = np.empty(((1 + multiplier) * n, length, features), dtype=np.float32)
    out[:n] = windows
    for copy in range(1, multiplier + 1):
        rng = np.random.default_rng([seed, copy])
        block = time_warp(windows, time_warp_sigma, knots, rng)
        block = magnitude_scale(block, scaling_sigma, rng)
        out[copy * n : (copy + 1) * n] = jitter(block, jitter_sigma, rng)
    return out
