"""Masking strategies: exact counts, shapes of the masked regions, determinism."""

from __future__ import annotations

import pytest
import torch

from moola.masking import make_mask, mask_block, mask_patch, mask_random, masked_count, patch_count


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D boolean tensor."""
    out, start = [], None
    for i, v in enumerate(row.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.mark.parametrize("strategy", ["random", "block", "patch"])
def test_shape_dtype_and_cpu(strategy):
    mask = make_mask(strategy, 7, 105, ratio=0.15, generator=gen(), patch_size=5, block_spans=2)
    assert mask.shape == (7, 105)
    assert mask.dtype == torch.bool
    assert mask.device.type == "cpu"


@pytest.mark.parametrize("length,ratio", [(105, 0.15), (24, 0.5), (10, 0.01), (33, 0.9)])
def test_random_masks_exactly_the_ratio(length, ratio):
    mask = mask_random(50, length, ratio, gen())
    assert (mask.sum(dim=1) == max(1, round(ratio * length))).all()


@pytest.mark.parametrize("length,ratio,spans", [(105, 0.15, 1), (105, 0.15, 3), (24, 0.5, 4), (5, 0.8, 3), (10, 0.05, 2)])
def test_block_masks_exact_count_in_contiguous_spans(length, ratio, spans):
    mask = mask_block(40, length, ratio, spans, gen(1))
    k = masked_count(length, ratio)
    assert (mask.sum(dim=1) == k).all()
    for row in mask:
        found = runs(row)
        # Blocks in neighbouring segments may touch and read as one; never more blocks than asked.
        assert 1 <= len(found) <= min(spans, k)
        if spans == 1:
            assert found[0][1] == k


def test_block_spans_land_one_per_segment():
    # 3 blocks of 10 steps in a window of 90: segment j (30 steps) holds exactly one block of 10.
    mask = mask_block(30, 90, 1 / 3, 3, gen(2))
    for row in mask:
        for j in range(3):
            segment = row[30 * j : 30 * (j + 1)]
            assert segment.sum() == 10
            assert len(runs(segment)) == 1


@pytest.mark.parametrize("length,patch,ratio", [(105, 5, 0.15), (23, 5, 0.4), (23, 5, 0.01), (12, 4, 0.9)])
def test_patch_masks_whole_patches(length, patch, ratio):
    mask = mask_patch(60, length, ratio, patch, gen(3))
    patches = patch_count(length, patch)
    want = max(1, round(ratio * patches))
    for row in mask:
        pieces = [row[i : i + patch] for i in range(0, length, patch)]
        assert len(pieces) == patches  # the last partial patch counts as a patch
        assert all(bool(p.all()) or not bool(p.any()) for p in pieces)
        assert sum(bool(p.all()) for p in pieces) == want
    # Within one patch of the asked share of the window.
    assert (mask.sum(dim=1) - ratio * length).abs().max() <= patch


def test_last_partial_patch_can_be_masked():
    mask = mask_patch(200, 23, 0.2, 5, gen(4))  # patches of 5,5,5,5,3
    assert mask[:, 20:].all(dim=1).any()
    assert (mask[:, 20:].sum(dim=1) % 3 == 0).all()


@pytest.mark.parametrize("strategy", ["random", "block", "patch"])
def test_same_generator_state_same_masks_and_rows_differ(strategy):
    a = make_mask(strategy, 16, 60, ratio=0.2, generator=gen(42), patch_size=5, block_spans=2)
    b = make_mask(strategy, 16, 60, ratio=0.2, generator=gen(42), patch_size=5, block_spans=2)
    c = make_mask(strategy, 16, 60, ratio=0.2, generator=gen(43), patch_size=5, block_spans=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) > 1


@pytest.mark.parametrize("strategy", ["random", "block", "patch"])
def test_every_position_can_be_masked(strategy):
    mask = make_mask(strategy, 500, 40, ratio=0.15, generator=gen(5), patch_size=5, block_spans=1)
    assert mask.any(dim=0).all()


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown mask strategy 'span'"):
        make_mask("span", 2, 10, ratio=0.2, generator=gen())
