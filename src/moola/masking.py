"""Which time steps the masked autoencoder must reconstruct.

Every function returns a boolean tensor (n, length), True where a step is masked, drawn from the given
torch.Generator only (same generator state => same masks), on the CPU. Every row masks the same number of steps
(random, block) or of patches (patch), so the loss weighs every window alike.
"""

from __future__ import annotations

import torch

from moola.params import MASK_STRATEGIES


def masked_count(length: int, ratio: float) -> int:
    """round(ratio * length), at least 1 (an empty mask has no loss) and at most length."""
    return min(length, max(1, round(ratio * length)))


def _choose(n: int, length: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct positions per row, uniformly: the k smallest of n x length uniform draws."""
    scores = torch.rand(n, length, generator=generator)
    chosen = scores.argsort(dim=1, stable=True)[:, :k]
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask


def mask_random(n: int, length: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Independent steps: exactly masked_count(length, ratio) per row, anywhere."""
    return _choose(n, length, masked_count(length, ratio), generator)


def _span_sizes(length: int, k: int, spans: int) -> tuple[list[int], list[int], list[int]]:
    """Segment starts and lengths (the window cut into `spans` near-equal parts) and a sub-span size per segment.

    Sizes are proportional to the segment lengths and sum to k; none exceeds its segment, so each sub-span fits.
    """
    bounds = [round(j * length / spans) for j in range(spans + 1)]
    starts = bounds[:-1]
    seg_lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    sizes = [k * s // length for s in seg_lengths]
    j = 0
    while sum(sizes) < k:  # hand out the remainder one step at a time to segments with room left
        if sizes[j] < seg_lengths[j]:
            sizes[j] += 1
        j = (j + 1) % spans
    return starts, seg_lengths, sizes


def mask_block(n: int, length: int, ratio: float, spans: int, generator: torch.Generator) -> torch.Tensor:
    """`spans` contiguous blocks per row summing to masked_count(length, ratio) steps.

    The window is cut into `spans` equal segments and one block is placed at a random offset inside each, so
    blocks never overlap and their total is exact. (Blocks in neighbouring segments may touch.)
    """
    k = masked_count(length, ratio)
    spans = max(1, min(spans, k))
    starts, seg_lengths, sizes = _span_sizes(length, k, spans)
    seg_start = torch.tensor(starts)
    size = torch.tensor(sizes)
    room = torch.tensor(seg_lengths) - size + 1  # possible offsets of each block inside its segment
    offset = (torch.rand(n, spans, generator=generator) * room).long().clamp_max(room - 1)
    block_start = (seg_start + offset).unsqueeze(-1)  # (n, spans, 1)
    steps = torch.arange(length)
    inside = (steps >= block_start) & (steps < block_start + size.unsqueeze(-1))  # (n, spans, length)
    return inside.any(dim=1)


def patch_count(length: int, patch_size: int) -> int:
    """Patches in a window; the last partial patch counts as one."""
    return -(-length // patch_size)


def mask_patch(n: int, length: int, ratio: float, patch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Whole patches of `patch_size` steps: round(ratio * patches) of them per row, at least 1."""
    patches = patch_count(length, patch_size)
    chosen = _choose(n, patches, masked_count(patches, ratio), generator)  # (n, patches)
    patch_of_step = torch.arange(length) // patch_size
    return chosen[:, patch_of_step]


def make_mask(
    strategy: str,
    n: int,
    length: int,
    *,
    ratio: float,
    generator: torch.Generator,
    patch_size: int = 5,
    block_spans: int = 1,
) -> torch.Tensor:
    """Dispatch on the strategy name (one of MASK_STRATEGIES)."""
    if strategy == "random":
        return mask_random(n, length, ratio, generator)
    if strategy == "block":
        return mask_block(n, length, ratio, block_spans, generator)
    if strategy == "patch":
        return mask_patch(n, length, ratio, patch_size, generator)
    raise ValueError(f"unknown mask strategy {strategy!r} (expected one of: {', '.join(MASK_STRATEGIES)})")
