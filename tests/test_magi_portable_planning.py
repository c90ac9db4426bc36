"""magi_portable/planning.py: the chunks each CP rank holds, their balance, the query ranges, the plan."""

import random

import pytest
import torch

from magi_portable import compute_pad_size, default_chunk_size, infer_varlen_mask_from_batch
from magi_portable.planning import area_imbalance, assign_chunks, build_plan, query_ranges, token_attn_areas


def test_small_helpers():
    assert compute_pad_size(100, 4, 8) == 28
    assert compute_pad_size(128, 4, 8) == 0
    cu_q, cu_k = infer_varlen_mask_from_batch(3, 5, device="cpu")
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == [0, 5, 10, 15] and cu_k.tolist() == cu_q.tolist()
    assert default_chunk_size(8192, 8) == 128 and default_chunk_size(10**6, 8) == 512


def check_assignment(rank_chunks, rank_areas, cu_seqlens, causal, chunk_size, padded_total):
    num_chunks = padded_total // chunk_size
    assert sorted(c for chunks in rank_chunks for c in chunks) == list(range(num_chunks))
    assert len({len(chunks) for chunks in rank_chunks}) == 1
    areas = token_attn_areas(cu_seqlens, causal, padded_total).view(num_chunks, chunk_size).sum(1)
    assert [int(areas[list(chunks)].sum()) for chunks in rank_chunks] == list(rank_areas)
    assert sum(rank_areas) == int(token_attn_areas(cu_seqlens, causal, padded_total).sum())


def test_balance_causal_8192_cp8():
    rank_chunks, rank_areas = assign_chunks([0, 8192], True, 512, 8, 8192)
    check_assignment(rank_chunks, rank_areas, [0, 8192], True, 512, 8192)
    assert area_imbalance(rank_areas) <= 1.05
    assert any(chunks[1] != chunks[0] + 1 for chunks in rank_chunks)  # non-contiguous shards


@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_one_causal_sample_is_cut_into_a_head_and_a_tail_per_rank(cp_size):
    # FlashAttention-4 attends each contiguous query range of a rank in one call: the plan keeps them few.
    chunk_size = default_chunk_size(131072, cp_size)
    rank_chunks, rank_areas = assign_chunks([0, 131072], True, chunk_size, cp_size, 131072)
    check_assignment(rank_chunks, rank_areas, [0, 131072], True, chunk_size, 131072)
    assert area_imbalance(rank_areas) == 1.0
    for chunks in rank_chunks:
        ranges, num_pad = query_ranges(chunks, chunk_size, [0, 131072])
        assert 1 <= len(ranges) <= 2 and num_pad == 0
        assert sum(r.length for r in ranges) == 131072 // cp_size


@pytest.mark.parametrize("causal", [True, False])
def test_balance_random_varlen(causal):
    # >= 8 chunks per rank, as the default chunk size guarantees. With only 4 the greedy can reach
    # about 1.15 on full masks made of a few long samples (equal-area chunks pack unevenly).
    rng = random.Random(0)
    for _ in range(30):
        cp_size, chunk_size = rng.choice([2, 4, 8]), rng.choice([32, 64, 128])
        chunks_per_rank = rng.randint(8, 16)
        target = cp_size * chunk_size * chunks_per_rank - rng.randint(0, chunk_size - 1)
        cu_seqlens = [0]
        while cu_seqlens[-1] < target:
            cu_seqlens.append(min(target, cu_seqlens[-1] + rng.randint(1, target // 2)))
        padded_total = target + compute_pad_size(target, cp_size, chunk_size)
        rank_chunks, rank_areas = assign_chunks(cu_seqlens, causal, chunk_size, cp_size, padded_total)
        check_assignment(rank_chunks, rank_areas, cu_seqlens, causal, chunk_size, padded_total)
        assert area_imbalance(rank_areas) <= 1.10, (cu_seqlens, cp_size, chunk_size)


def test_the_plan_places_every_token_once():
    cu_seqlens, chunk_size, cp_size = [0, 30, 31, 90, 101], 8, 4
    padded = 101 + compute_pad_size(101, cp_size, chunk_size)
    plans = [build_plan(cu_seqlens, True, chunk_size, padded, cp_size, rank, "cpu") for rank in range(cp_size)]
    # The ranks' local tokens, concatenated, are the dispatch order, and global_to_dispatch inverts it.
    assert torch.equal(torch.cat([p.local_token_index for p in plans]), plans[0].dispatch_order)
    assert torch.equal(plans[0].dispatch_order[plans[0].global_to_dispatch], torch.arange(padded))
    for plan in plans:
        # The query ranges cover the valid local tokens in order, each inside its sample; the pad tail follows.
        covered = [plan.local_token_index[r.local_start + i].item() for r in plan.query_ranges for i in range(r.length)]
        assert covered == [g for r in plan.query_ranges for g in range(r.global_start, r.global_start + r.length)]
        assert all(r.sample_start <= r.global_start and r.global_start + r.length <= r.sample_end
                   for r in plan.query_ranges)
        assert len(covered) + plan.num_local_pad == padded // cp_size
        assert (plan.local_token_index[len(covered):] >= 101).all()
    with pytest.raises(ValueError, match="leave a CP rank with no tokens: use a chunk_size of at most 3"):
        build_plan([0, 9], True, 8, 32, 4, 0, "cpu")
