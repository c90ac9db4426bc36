"""Planning: which chunks of the token stream each CP rank holds, as pure functions of the mask and the sizes.

The padded token stream is cut into chunks of ``chunk_size``; every rank gets the same number of chunks. Chunks are
grouped into units of consecutive chunks and the units assigned greedily (largest attention area first, to the
least-loaded rank with room), with the coarsest units that keep the busiest rank within AREA_IMBALANCE_TOLERANCE of
the mean area: few contiguous query ranges per rank (for one causal sample, a head and a tail), so that few key
ranges are needed.
"""

import bisect
import heapq
import math
from dataclasses import dataclass

import torch

DEFAULT_MAX_CHUNK_SIZE = 512
AREA_IMBALANCE_TOLERANCE = 1.05  # the busiest rank may carry this much of the mean attention area


def compute_pad_size(total_seqlen: int, cp_size: int, chunk_size: int) -> int:
    """Tokens to append so that the sequence splits into cp_size * k chunks of chunk_size."""
    return -total_seqlen % (cp_size * chunk_size)


def default_chunk_size(total_seqlen: int, cp_size: int) -> int:
    """Chunk size used when none is given (v1.1.1): 512, capped so each rank gets >= 8 chunks."""
    return max(1, min(DEFAULT_MAX_CHUNK_SIZE, math.ceil(total_seqlen / (8 * cp_size))))


def infer_varlen_mask_from_batch(
    batch_size: int, seq_len: int, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_q, cu_seqlens_k), int32 of shape [batch_size + 1]: each sample its own sequence."""
    cu_seqlens = torch.arange(0, batch_size + 1, dtype=torch.int32, device=device) * seq_len
    return cu_seqlens, cu_seqlens


def token_attn_areas(cu_seqlens: list[int], causal: bool, padded_total_seqlen: int) -> torch.Tensor:
    """Number of keys each token may attend to (0 for pad tokens), int64 [padded_total_seqlen]."""
    starts = torch.tensor(cu_seqlens[:-1], dtype=torch.int64)
    lengths = torch.tensor(cu_seqlens[1:], dtype=torch.int64) - starts
    if causal:
        positions = torch.arange(cu_seqlens[-1], dtype=torch.int64)
        areas = positions - torch.repeat_interleave(starts, lengths) + 1
    else:
        areas = torch.repeat_interleave(lengths, lengths)
    return torch.cat([areas, areas.new_zeros(padded_total_seqlen - cu_seqlens[-1])])


def _greedy_assign(unit_areas: list[int], cp_size: int) -> tuple[list[list[int]], list[int]]:
    """Largest unit first, to the least-loaded rank that still has room; every rank gets the same number of units."""
    units_per_rank = len(unit_areas) // cp_size
    rank_units = [[] for _ in range(cp_size)]
    rank_areas = [0] * cp_size
    heap = [(0, rank) for rank in range(cp_size)]  # (area so far, rank); only ranks with room
    for unit in sorted(range(len(unit_areas)), key=lambda u: -unit_areas[u]):
        area, rank = heapq.heappop(heap)
        rank_units[rank].append(unit)
        rank_areas[rank] = area + unit_areas[unit]
        if len(rank_units[rank]) < units_per_rank:
            heapq.heappush(heap, (rank_areas[rank], rank))
    return rank_units, rank_areas


def assign_chunks(
    cu_seqlens: list[int], causal: bool, chunk_size: int, cp_size: int, padded_total_seqlen: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Load balancing of equal-size chunks over CP ranks: greedy over units of consecutive chunks, the coarsest
    units whose busiest rank carries at most AREA_IMBALANCE_TOLERANCE x the mean area (else the best balanced).
    Coarse units keep each rank's chunks in few contiguous runs; for one causal sample, two units per rank give
    the head-and-tail split, which is exactly balanced.

    Returns (chunk ids of each rank in ascending order, attention area of each rank)."""
    num_chunks = padded_total_seqlen // chunk_size
    chunks_per_rank = num_chunks // cp_size
    chunk_areas = token_attn_areas(cu_seqlens, causal, padded_total_seqlen).view(num_chunks, chunk_size).sum(1)
    best = None
    for units_per_rank in (n for n in range(1, chunks_per_rank + 1) if chunks_per_rank % n == 0):
        unit_size = chunks_per_rank // units_per_rank
        rank_units, rank_areas = _greedy_assign(chunk_areas.view(-1, unit_size).sum(1).tolist(), cp_size)
        rank_chunks = tuple(
            tuple(sorted(u * unit_size + i for u in units for i in range(unit_size))) for units in rank_units
        )
        # A rank without tokens (area 0) would not take part in the backward's reduce-scatter: avoid it.
        score = (min(rank_areas) == 0, area_imbalance(rank_areas))
        if score <= (False, AREA_IMBALANCE_TOLERANCE):
            return rank_chunks, tuple(rank_areas)
        if best is None or score < best[0]:
            best = (score, (rank_chunks, tuple(rank_areas)))
    return best[1]


def area_imbalance(rank_areas: tuple[int, ...]) -> float:
    """Busiest rank's attention area / mean area (1.0 is perfect balance)."""
    mean_area = sum(rank_areas) / len(rank_areas)
    return max(rank_areas) / mean_area if mean_area > 0 else 1.0


@dataclass(frozen=True)
class QueryRange:
    """Consecutive local queries of one sample: local tokens [local_start, local_start + length) are the global
    tokens [global_start, global_start + length) of the sample [sample_start, sample_end)."""

    local_start: int
    global_start: int
    length: int
    sample_start: int
    sample_end: int

    def key_end(self, causal: bool, num_queries: int | None = None) -> int:
        """End of the keys that the first num_queries (default: all) of these queries may see."""
        return self.global_start + (self.length if num_queries is None else num_queries) if causal else self.sample_end


@dataclass(eq=False)
class Plan:
    """Where every token of a key lives, computed once per key. Tensors live on one device."""

    cp_size: int
    cp_rank: int
    rank_chunks: tuple[tuple[int, ...], ...]
    rank_areas: tuple[int, ...]
    local_token_index: torch.Tensor  # global (padded) position of each local token
    dispatch_order: torch.Tensor  # global position of each token as gathered: rank-major, chunk order
    global_to_dispatch: torch.Tensor  # inverse permutation of dispatch_order
    query_ranges: list[QueryRange]  # this rank's queries, in local order; the pad tail follows them
    num_local_pad: int


def query_ranges(my_chunks, chunk_size, cu_seqlens) -> tuple[list[QueryRange], int]:
    """Maximal runs of consecutive local chunks, cut at sample borders; and the number of local pad tokens."""
    total = cu_seqlens[-1]
    ranges, local_start, num_local_pad = [], 0, 0
    run_starts = [i for i, c in enumerate(my_chunks) if i == 0 or my_chunks[i - 1] != c - 1]
    for i, run_start in enumerate(run_starts):
        run_end = run_starts[i + 1] if i + 1 < len(run_starts) else len(my_chunks)
        begin = my_chunks[run_start] * chunk_size
        end = (my_chunks[run_end - 1] + 1) * chunk_size
        num_local_pad += max(0, end - max(begin, total))
        first_sample = bisect.bisect_right(cu_seqlens, begin) - 1
        for sample_start, sample_end in zip(cu_seqlens[first_sample:-1], cu_seqlens[first_sample + 1 :]):
            if sample_start >= end:
                break
            lo, hi = max(begin, sample_start), min(end, sample_end)
            if hi > lo:
                ranges.append(QueryRange(local_start + lo - begin, lo, hi - lo, sample_start, sample_end))
        local_start += end - begin
    # Pad tokens sit at the global end, so they form the tail of every rank's local tokens.
    assert sum(r.length for r in ranges) + num_local_pad == local_start
    return ranges, num_local_pad


def build_plan(cu_seqlens, causal, chunk_size, padded_total, cp_size, cp_rank, device) -> Plan:
    total = cu_seqlens[-1]
    rank_chunks, rank_areas = assign_chunks(cu_seqlens, causal, chunk_size, cp_size, padded_total)
    if min(rank_areas) == 0:
        raise ValueError(
            f"{total} tokens in chunks of {chunk_size} leave a CP rank with no tokens: use a chunk_size of at most "
            f"{math.ceil(total / cp_size)} (see default_chunk_size)"
        )

    def token_index(chunks):
        return (torch.tensor(chunks).unsqueeze(1) * chunk_size + torch.arange(chunk_size)).flatten()

    dispatch_order = torch.cat([token_index(chunks) for chunks in rank_chunks])
    ranges, num_local_pad = query_ranges(rank_chunks[cp_rank], chunk_size, cu_seqlens)
    return Plan(
        cp_size=cp_size,
        cp_rank=cp_rank,
        rank_chunks=rank_chunks,
        rank_areas=rank_areas,
        local_token_index=token_index(rank_chunks[cp_rank]).to(device),
        dispatch_order=dispatch_order.to(device),
        global_to_dispatch=torch.argsort(dispatch_order).to(device),
        query_ranges=ranges,
        num_local_pad=num_local_pad,
    )
