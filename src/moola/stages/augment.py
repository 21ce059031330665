"""Stage augment@<recipe>: the training split of the unlabeled windows -> data/augmented/<recipe>.npy.

Only the training split is augmented: augmented copies of validation windows would leak into training.
"""

from __future__ import annotations

import argparse
import time
import zlib

from moola import io, paths
from moola.augmentation import augment_windows
from moola.errors import run_main
from moola.params import Params, load_params
from moola.windows import read_windows


def augment_arguments(p: Params, recipe: str) -> dict:
    """augment_windows' arguments but the windows, for one recipe: what this stage runs (and benchmarks/ times)."""
    r = p.recipe(recipe)
    return dict(
        multiplier=r.multiplier,
        time_warp_sigma=r.time_warp_sigma,
        jitter_sigma=p.augment.jitter_sigma,
        scaling_sigma=p.augment.scaling_sigma,
        knots=p.augment.time_warp_knots,
        # The recipe's name is part of the seed: two recipes never draw the same warps.
        seed=zlib.crc32(recipe.encode()) ^ p.seed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", required=True, help="a key of augment.recipes in params.yaml")
    args = parser.parse_args()
    p = load_params()
    recipe = p.recipe(args.recipe)
    windows = read_windows(paths.UNLABELED)
    train = windows.values[windows.split == "train"]
    began = time.perf_counter()
    augmented = augment_windows(train, **augment_arguments(p, args.recipe))
    seconds = time.perf_counter() - began
    io.write_npy(paths.augmented(args.recipe), augmented)
    print(
        f"Augmented {len(train):,} training windows x (1 + {recipe.multiplier}) = {len(augmented):,} samples "
        f"(time warp sigma {recipe.time_warp_sigma}) in {seconds:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    run_main(main)
