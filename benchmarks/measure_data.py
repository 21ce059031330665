"""Item 3, data: the example market and prepare's core, and windowing and augment (vectorised) against the plain
per-window Python loops they replaced, on the data the stages make."""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Settings, timed
from benchmarks.throughput import SPEC_EXPERIMENT, median
from moola.augmentation import augment_windows
from moola.params import FEATURES, Params
from moola.stages.augment import augment_arguments
from moola.windows import cut_windows, normalise


def windows_per_window_loop(prices: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """The plain version of cut_windows + normalise: one window at a time."""
    low_col, high_col = FEATURES.index("low"), FEATURES.index("high")
    out = np.empty((len(starts), window, len(FEATURES)), dtype=np.float32)
    for i, start in enumerate(starts):
        w = prices[start : start + window]
        low, high = w[:, low_col].min(), w[:, high_col].max()
        out[i] = (w - low) / (high - low) if high > low else 0.5
    return out


def augment_per_window_loop(windows: np.ndarray, multiplier: int, time_warp_sigma: float, jitter_sigma: float,
                            scaling_sigma: float, knots: int, seed: int) -> np.ndarray:
    """The plain version of augment_windows: the same transforms, one window and one feature at a time."""
    n, length, features = windows.shape
    steps = np.arange(length, dtype=np.float64)
    anchor_x = np.linspace(0.0, length - 1, knots + 2)
    out = np.empty((multiplier * n, length, features), dtype=np.float32)
    for copy in range(multiplier):
        rng = np.random.default_rng([seed, copy + 1])
        for i in range(n):
            speed = np.interp(steps, anchor_x, np.clip(rng.normal(1.0, time_warp_sigma, knots + 2), 0.05, None))
            position = np.cumsum(speed) - speed[0]
            position *= (length - 1) / position[-1]
            warped = np.stack([np.interp(position, steps, windows[i, :, f]) for f in range(features)], axis=1)
            warped = (warped - 0.5) * rng.normal(1.0, scaling_sigma) + 0.5
            out[copy * n + i] = warped + rng.normal(0.0, jitter_sigma, size=warped.shape)
    return out


def bench_data(p: Params, s: Settings) -> tuple[dict, dict]:
    """Item 3: prepare and augment (vectorised) against per-window loops; returns the figures and the arrays."""
    from moola.market import example_data
    from moola.preparation import prepare
    from moola.windows import unlabeled_starts, validate_bars

    d = p.data
    n_windows = p.unlabeled_windows + d.labeled_windows

    def example_then_prepare():
        bars, labels, _ = example_data(p.seed, d.window, d.stride, d.unlabeled_windows, d.labeled_windows,
                                       d.min_final_segment)
        out = prepare(p, validate_bars(bars), labels)
        return bars, (out.unlabeled, out.labeled)

    prepare_runs, (bars, (unlabeled, labeled)) = timed(example_then_prepare, s.data_repeats)
    prices = bars[list(FEATURES)].to_numpy()
    starts = unlabeled_starts(len(bars), d.window, d.stride, p.unlabeled_windows)

    vector_runs, vectorised = timed(lambda: normalise(cut_windows(prices, starts, p.data.window)), s.data_repeats)
    loop_runs, looped = timed(lambda: windows_per_window_loop(prices, starts, p.data.window), s.data_repeats)
    if not np.allclose(vectorised, looped, atol=1e-6):
        raise AssertionError("the per-window windowing loop disagrees with cut_windows + normalise")

    train = unlabeled.values[unlabeled.split == "train"]
    val = unlabeled.values[unlabeled.split == "val"]
    recipe_name = p.experiment(SPEC_EXPERIMENT).augment
    # The stage's own arguments (its seed formula included): the bench augments what `dvc repro augment` does.
    kwargs = augment_arguments(p, recipe_name)
    augment_runs, augmented = timed(lambda: augment_windows(train, **kwargs), s.data_repeats)
    # The loop is slow by design: time it on a slice and give its rate.
    sample = train[: min(len(train), 1000)]
    augment_loop_runs, _ = timed(lambda: augment_per_window_loop(sample, **kwargs), s.data_repeats)
    multiplier = kwargs["multiplier"]
    made = len(train) * multiplier
    figures = {
        "prepare": {
            "windows": n_windows,
            "seconds": median(prepare_runs),
            "windows_per_second": n_windows / median(prepare_runs),
            "note": "the example_market and prepare cores: market generation, windowing, normalisation, split",
        },
        "windowing": {
            "windows": len(starts),
            "vectorised_windows_per_second": len(starts) / median(vector_runs),
            "per_window_loop_windows_per_second": len(starts) / median(loop_runs),
            "speedup": median(loop_runs) / median(vector_runs),
        },
        "augment": {
            "recipe": recipe_name,
            "train_windows": len(train),
            "windows_made": made,
            "seconds": median(augment_runs),
            "vectorised_windows_per_second": made / median(augment_runs),
            "per_window_loop_windows_per_second": len(sample) * multiplier / median(augment_loop_runs),
            "per_window_loop_windows_timed": len(sample) * multiplier,
        },
    }
    figures["augment"]["speedup"] = (figures["augment"]["vectorised_windows_per_second"]
                                     / figures["augment"]["per_window_loop_windows_per_second"])
    arrays = {"train": augmented, "val": val, "labeled": labeled, "train_windows": len(train)}
    return figures, arrays
