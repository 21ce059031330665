"""Stage augment@<recipe>: the training split of the unlabeled windows -> data/augmented/<recipe>.npy.

Only the training split is augmented: augmented copies of validation windows would leak into training.
"""

from __future__ import annotations

import argparse
import time
import zlib


from moola import io, paths
from moola.augment import augment_windows
from moola.errors import ParamsError, run_main
from moola.params import PARAMS_FILE, Params, load_params
from moola.windows import UNLABELED, read_windows


def output_path(recipe: str) -> str:
    return paths.augmented(recipe)


def augment_arguments(p: Params, recipe: str) -> dict:
    """augment_windows' arguments but the windows, for one recipe: what this stage runs (and benchmarks/ times)."""
    r = p.augment.recipes[recipe]
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
    if args.recipe not in p.augment.recipes:
        raise ParamsError(
            f"{PARAMS_FILE}: augment.recipes has no recipe '{args.recipe}' "
            f"(expected one of: {', '.join(p.augment.recipes)})"
        )
    recipe = p.augment.recipes[args.recipe]
    windows = read_windows(UNLABELED)
    train = windows.values[windows.split == "train"]
    began = time.perf_counter()
    augmented = augment_windows(train, **augment_arguments(p, args.recipe))
    seconds = time.perf_counter() - began
    io.write_npy(output_path(args.recipe), augmented)
    print(
        f"Augmented {len(train):,} training windows x (1 + {recipe.multiplier}) = {len(augmented):,} samples "
        f"(time warp sigma {recipe.time_warp_sigma}) in {seconds:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    run_main(main)
