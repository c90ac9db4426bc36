"""Portable stand-in for the subset of ``magi_attention.api`` (v1.1.x) this project uses.

Plain PyTorch + torch.distributed: runs on CPU (gloo) and GPU (NCCL); on Hopper and Blackwell GPUs its attention
kernel is FlashAttention-4 when that is installed. The names and meanings are the real API's, so callers can import
either module. Differences from the real API: ``magi_attn_varlen_key`` takes ``pad_size`` and ``chunk_size`` as
v1.1.0 did (v1.1.1 deprecates them) and only self-attention without sliding windows; ``calc_attn`` has no
``return_max_logits``, sinks or softcap; ``DistAttnConfig`` options are accepted and ignored.

How it works
- Planning (once per key): the padded token stream is cut into chunks of ``chunk_size``; every rank gets the same
  number of chunks. Chunks are grouped into units of consecutive chunks and the units assigned greedily (largest
  attention area first, to the least-loaded rank with room), with the coarsest units that keep the busiest rank
  within AREA_IMBALANCE_TOLERANCE of the mean area: few contiguous query ranges per rank (for one causal sample,
  a head and a tail), so that few key ranges are needed.
- ``dispatch`` / ``undispatch`` move tokens between the global order and the rank-local order.
- ``calc_attn`` all-gathers K and V over the CP group (its backward reduce-scatters dK/dV), then computes exact
  masked attention of each local query range against its sample's keys (up to the range's end if causal), with
  one of these kernels (MAGI_ATTENTION_KERNEL_BACKEND forces one; the first call logs which one runs):
  ``fa4``: FlashAttention-4's varlen kernel, one call for all ranges (CUDA, Hopper or Blackwell, bf16/fp16);
  ``sdpa``: the kernel SDPA itself picks (cuDNN on Hopper), once per sample, at CP 1 only;
  ``flex``: compiled FlexAttention with a block mask cached on the key (CUDA);
  ``torch``: matmuls per block of queries (any device; the CPU's kernel).
  The fa4 and torch kernels run as one operator, ``magi_portable::attention``, whose backward starts from the
  operator's own out and lse: gradient checkpointing can keep those and skip the kernel when it recomputes a layer
  (long_context.py's keep_attention_outputs). The sdpa kernel's operators are SDPA's own, with such a backward too.

Communication per attention layer, per rank, with S padded tokens, h_kv key/value heads, head
size d and b bytes per element: forward all-gathers (cp-1)/cp * S * 2 * h_kv * d * b bytes;
backward reduce-scatters the same amount of dK/dV. Ring attention passes the same K/V volume
around the ring in cp-1 steps and overlaps it with compute; the all-gather is simpler but does
not overlap and briefly holds all of K/V on every rank. MagiAttention sends only the ranges each
rank needs. With GQA, K/V are h_kv/h_q of Q's size, so the gathered volume stays small.
"""

import atexit
import bisect
import functools
import heapq
import importlib.util
import logging
import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from einops import rearrange
from torch.distributed.device_mesh import DeviceMesh

DEFAULT_MAX_CHUNK_SIZE = 512
_MAX_CACHED_KEYS = 100  # like the real library's runtime dict: varlen batches change every step


# --- Small helpers from magi_attention.api.functools ---


def compute_pad_size(total_seqlen: int, cp_size: int, chunk_size: int) -> int:
    """Tokens to append so that the sequence splits into cp_size * k chunks of chunk_size."""
    return -total_seqlen % (cp_size * chunk_size)


def default_chunk_size(total_seqlen: int, cp_size: int) -> int:
    """Chunk size used when none is given (v1.1.1): 512, capped so each rank gets >= 8 chunks."""
    return max(1, min(DEFAULT_MAX_CHUNK_SIZE, math.ceil(total_seqlen / (8 * cp_size))))


def squash_batch_dim(x: torch.Tensor) -> torch.Tensor:
    """[b, s, ...] -> [b*s, ...]."""
    return rearrange(x, "b s ... -> (b s) ...")


def infer_varlen_mask_from_batch(
    batch_size: int, seq_len: int, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_q, cu_seqlens_k), int32 of shape [batch_size + 1]: each sample its own sequence."""
    cu_seqlens = torch.arange(0, batch_size + 1, dtype=torch.int32, device=device) * seq_len
    return cu_seqlens, cu_seqlens


# --- Planning: which chunks each rank holds (a pure function of the mask and the sizes) ---


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


AREA_IMBALANCE_TOLERANCE = 1.05  # the busiest rank may carry this much of the mean attention area


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
class _Plan:
    """Everything a key needs at run time, computed once per key. Tensors live on one device."""

    cp_size: int
    cp_rank: int
    rank_chunks: tuple[tuple[int, ...], ...]
    rank_areas: tuple[int, ...]
    local_token_index: torch.Tensor  # global (padded) position of each local token
    dispatch_order: torch.Tensor  # global position of each token as gathered: rank-major, chunk order
    global_to_dispatch: torch.Tensor  # inverse permutation of dispatch_order
    token_sample_id: torch.Tensor  # sample index of each global position, -1 for pad tokens
    query_ranges: list[QueryRange]  # this rank's queries, in local order; the pad tail follows them
    num_local_pad: int
    # fa4: each query range attends to its own copy of its keys, laid end to end. Positions in the gathered
    # (dispatch-ordered) K/V of those keys, None where they are the local tokens as they are (CP 1).
    key_index: torch.Tensor | None
    cu_seqlens_q: torch.Tensor  # int32, over the query ranges
    cu_seqlens_k: torch.Tensor  # int32, over their keys
    max_seqlen_q: int
    max_seqlen_k: int
    num_keys: int  # all ranges' keys, laid end to end
    block_mask: object = None  # FlexAttention BlockMask, built on first CUDA call


def _query_ranges(my_chunks, chunk_size, cu_seqlens):
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


def _build_plan(cu_seqlens, causal, chunk_size, padded_total, group, device) -> _Plan:
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
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
    global_to_dispatch = torch.argsort(dispatch_order)
    lengths = torch.tensor(cu_seqlens[1:]) - torch.tensor(cu_seqlens[:-1])
    sample_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    query_ranges, num_local_pad = _query_ranges(rank_chunks[cp_rank], chunk_size, cu_seqlens)

    key_ranges = [(r.sample_start, r.key_end(causal)) for r in query_ranges]
    query_lengths, key_lengths = [r.length for r in query_ranges], [end - start for start, end in key_ranges]
    key_index = torch.cat([torch.zeros(0, dtype=torch.long), *(global_to_dispatch[s:e] for s, e in key_ranges)])
    if torch.equal(key_index, torch.arange(len(key_index))):
        key_index = None  # the keys are the first gathered tokens, in order: no copy needed

    def cumulative(lengths):
        return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    return _Plan(
        cp_size=cp_size,
        cp_rank=cp_rank,
        rank_chunks=rank_chunks,
        rank_areas=rank_areas,
        local_token_index=token_index(rank_chunks[cp_rank]).to(device),
        dispatch_order=dispatch_order.to(device),
        global_to_dispatch=global_to_dispatch.to(device),
        token_sample_id=torch.cat([sample_id, sample_id.new_full((padded_total - total,), -1)]).to(device),
        query_ranges=query_ranges,
        num_local_pad=num_local_pad,
        key_index=None if key_index is None else key_index.to(device),
        cu_seqlens_q=cumulative(query_lengths),
        cu_seqlens_k=cumulative(key_lengths),
        max_seqlen_q=max(query_lengths, default=0),
        max_seqlen_k=max(key_lengths, default=0),
        num_keys=sum(key_lengths),
    )


# --- The key ---


@dataclass(frozen=True)
class DistAttnRuntimeKey:
    """Hashable description of one distributed attention setup; carries its cached plan."""

    cu_seqlens: tuple[int, ...]
    causal: bool
    num_heads_q: int
    num_heads_kv: int
    head_dim: int
    pad_size: int
    chunk_size: int
    cp_group: dist.ProcessGroup
    plan: _Plan = field(default=None, compare=False, repr=False)

    @property
    def cp_size(self) -> int:
        return self.plan.cp_size

    @property
    def cp_rank(self) -> int:
        return self.plan.cp_rank

    @property
    def total_seqlen(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def padded_total_seqlen(self) -> int:
        return self.cu_seqlens[-1] + self.pad_size

    @property
    def num_local_tokens(self) -> int:
        return self.padded_total_seqlen // self.plan.cp_size

    @property
    def attn_area_imbalance(self) -> float:
        return area_imbalance(self.plan.rank_areas)


_cached_keys: "OrderedDict[DistAttnRuntimeKey, DistAttnRuntimeKey]" = OrderedDict()
_most_recent_key: dict[dist.ProcessGroup, DistAttnRuntimeKey] = {}


@atexit.register
def _release_cached_keys():
    """The cached keys hold their CP process groups, and destroy_process_group() leaves a gloo group's threads
    running while anything holds it. Let go of the groups while the interpreter is alive: joined during its
    shutdown, those threads can abort a finished run (SIGABRT, "terminate called without an active exception")."""
    _cached_keys.clear()
    _most_recent_key.clear()


def magi_attn_varlen_key(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    num_heads_q: int,
    num_heads_kv: int,
    head_dim: int,
    pad_size: int,
    cp_group_or_mesh: dist.ProcessGroup | DeviceMesh,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    dist_attn_config=None,  # accepted for API compatibility; the portable planner has no options
    chunk_size: int | None = None,
) -> DistAttnRuntimeKey:
    """Key for varlen self-attention: sample i is tokens [cu[i], cu[i+1]), causal or full."""
    if isinstance(cp_group_or_mesh, DeviceMesh):
        if cp_group_or_mesh.ndim != 1:
            raise ValueError(f"the CP DeviceMesh must be 1-D, got {cp_group_or_mesh.ndim}-D")
        cp_group_or_mesh = cp_group_or_mesh.get_group()
    cu_seqlens = [int(n) for n in cu_seqlens_q.tolist()]
    if cu_seqlens != [int(n) for n in cu_seqlens_k.tolist()]:
        raise NotImplementedError("self-attention only: cu_seqlens_q must equal cu_seqlens_k")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"sliding windows are not supported: window_size={window_size}")
    if cu_seqlens[0] != 0 or cu_seqlens[-1] <= 0 or sorted(cu_seqlens) != cu_seqlens:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and hold tokens: {cu_seqlens}")
    if num_heads_kv <= 0 or num_heads_q % num_heads_kv != 0:
        raise ValueError(f"num_heads_q ({num_heads_q}) must be a multiple of num_heads_kv ({num_heads_kv})")

    cp_size, total = dist.get_world_size(cp_group_or_mesh), cu_seqlens[-1]
    if chunk_size is None:
        chunk_size = default_chunk_size(total, cp_size)
    if pad_size < 0 or (total + pad_size) % (cp_size * chunk_size) != 0:
        raise ValueError(
            f"pad_size={pad_size} does not make total_seqlen={total} a multiple of cp_size * chunk_size = "
            f"{cp_size} * {chunk_size}; use compute_pad_size({total}, {cp_size}, {chunk_size}) = "
            f"{compute_pad_size(total, cp_size, chunk_size)}"
        )

    group = cp_group_or_mesh
    key = DistAttnRuntimeKey(
        tuple(cu_seqlens), bool(causal), num_heads_q, num_heads_kv, head_dim, pad_size, chunk_size, group
    )
    cached = _cached_keys.pop(key, None)
    if cached is None:
        plan = _build_plan(cu_seqlens, key.causal, chunk_size, total + pad_size, group, cu_seqlens_q.device)
        cached = replace(key, plan=plan)
    _cached_keys[cached] = cached  # (re)inserted last: least recently used keys go first
    if len(_cached_keys) > _MAX_CACHED_KEYS:
        _cached_keys.popitem(last=False)
    _most_recent_key[group] = cached
    return cached


def get_most_recent_key(cp_group: dist.ProcessGroup) -> DistAttnRuntimeKey:
    """The last key built for this CP group. Passing keys explicitly is preferred."""
    if cp_group not in _most_recent_key:
        raise RuntimeError("no key was built for this CP group yet: call magi_attn_varlen_key first")
    return _most_recent_key[cp_group]


def get_attn_area_imbalance(key: DistAttnRuntimeKey) -> float:
    """Busiest rank's attention area / mean area for this key's chunk assignment."""
    return key.attn_area_imbalance


def get_position_ids(key: DistAttnRuntimeKey) -> torch.Tensor:
    """Global index of each local token; pad tokens are clamped to the last valid index."""
    return key.plan.local_token_index.clamp(max=max(key.total_seqlen - 1, 0))


# --- dispatch / undispatch ---

# torch 2.13 renamed these two collectives (the old names warn); older torch has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenation of every rank's x along dim 0, in rank order (plain collective, no autograd)."""
    if dist.get_world_size(group) == 1:
        return x
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


class _GatherKV(torch.autograd.Function):
    """All-gather along the token dim; backward reduce-scatters the gradient to its owner.
    (torch.distributed.nn.functional.all_gather does the same, but its gloo backward
    falls back to a scatter that breaks on groups without global rank 0.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        grad = grad_out.new_empty((grad_out.shape[0] // dist.get_world_size(ctx.group), *grad_out.shape[1:]))
        _reduce_scatter_single(grad, grad_out.contiguous(), group=ctx.group)
        return grad, None


class _Dispatch(torch.autograd.Function):
    """Take this rank's tokens of a replicated global tensor.

    Every rank holds the same x, and each rank's loss only reaches x through its own tokens, so
    the gradient of x is every rank's local gradient put back in place: an all-gather. (The
    autograd all-gather of torch.distributed.nn does the opposite direction, so it can't be used.)"""

    @staticmethod
    def forward(ctx, padded_x, key):
        ctx.key = key
        return padded_x.index_select(0, key.plan.local_token_index.to(padded_x.device))

    @staticmethod
    def backward(ctx, grad_local):
        plan = ctx.key.plan
        grad_gathered = _all_gather(grad_local, ctx.key.cp_group)
        return grad_gathered.index_select(0, plan.global_to_dispatch.to(grad_local.device)), None


class _Undispatch(torch.autograd.Function):
    """Rebuild the global tensor on every rank. Its adjoint is _Dispatch's forward: each rank
    keeps the gradient of its own tokens, no sum (every rank computes the same global loss)."""

    @staticmethod
    def forward(ctx, x_local, key):
        ctx.key = key
        gathered = _all_gather(x_local, key.cp_group)
        return gathered.index_select(0, key.plan.global_to_dispatch.to(x_local.device))[: key.total_seqlen]

    @staticmethod
    def backward(ctx, grad_global):
        key = ctx.key
        pad = grad_global.new_zeros((key.pad_size, *grad_global.shape[1:]))
        grad_padded = torch.cat([grad_global, pad])
        return grad_padded.index_select(0, key.plan.local_token_index.to(grad_global.device)), None


def dispatch(x: torch.Tensor, key: DistAttnRuntimeKey, pad_value: float = 0.0) -> torch.Tensor:
    """Global [total_tokens, ...] (same on every rank) -> this rank's padded chunks, in chunk order."""
    if x.shape[0] != key.total_seqlen:
        raise ValueError(f"dispatch expects {key.total_seqlen} tokens in dim 0, got {x.shape[0]}")
    padded_x = torch.cat([x, x.new_full((key.pad_size, *x.shape[1:]), pad_value)])
    return _Dispatch.apply(padded_x, key)


def undispatch(x: torch.Tensor, key: DistAttnRuntimeKey) -> torch.Tensor:
    """This rank's [local_tokens, ...] -> the global [total_tokens, ...] on every rank."""
    if x.shape[0] != key.num_local_tokens:
        raise ValueError(f"undispatch expects {key.num_local_tokens} tokens in dim 0, got {x.shape[0]}")
    return _Undispatch.apply(x, key)


# --- calc_attn ---


@dataclass
class AttnForwardMeta:
    lse: torch.Tensor  # [local_tokens, num_heads_q] float32 (float64 for float64 q); -inf on pad tokens


KERNEL_ENV = "MAGI_ATTENTION_KERNEL_BACKEND"
KERNELS = ("auto", "fa4", "sdpa", "flex", "torch")
logger = logging.getLogger(__name__)
_logged_kernels = set()


def _with_pad_tail(outs, lses, num_pad):
    """Concatenate the outputs and lse of the query ranges (or blocks), then the pad tokens' zeros and -inf."""
    if num_pad:
        outs = [*outs, outs[0].new_zeros((num_pad, *outs[0].shape[1:]))]
        lses = [*lses, lses[0].new_full((num_pad, lses[0].shape[1]), -math.inf)]
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))


def _grouped_scores(q, k, scale, causal):
    """Scaled scores of q [lq, hq, d] against k [lk, hkv, d] as [hkv, g * lq, lk], masked with -inf where causal
    (bottom-right aligned). Grouped-query heads share a kv head without copying it: q head h uses kv head h // g."""
    num_q, num_k, num_heads_kv = q.shape[0], k.shape[0], k.shape[1]
    q_grouped = rearrange(q, "lq (hkv g) d -> hkv (g lq) d", hkv=num_heads_kv)
    scores = torch.bmm(q_grouped, rearrange(k, "lk hkv d -> hkv d lk")) * scale
    if causal:
        last_visible_key = torch.arange(num_q, device=q.device)[:, None] + (num_k - num_q)
        allowed = torch.arange(num_k, device=q.device) <= last_visible_key
        scores = scores.view(num_heads_kv, -1, num_q, num_k).masked_fill(~allowed, -math.inf).flatten(1, 2)
    return scores


def _attend_block(q, k, v, scale, causal):
    """Exact attention of q [lq, hq, d] to k/v [lk, hkv, d]; causal is bottom-right aligned. Returns out like q and
    lse [lq, hq]."""
    num_q, num_heads_kv = q.shape[0], k.shape[1]
    scores = _grouped_scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.bmm(torch.exp(scores - lse.unsqueeze(-1)), rearrange(v, "lk hkv d -> hkv lk d"))
    out = rearrange(out, "hkv (g lq) d -> lq (hkv g) d", lq=num_q)
    return out, rearrange(lse, "hkv (g lq) -> lq (hkv g)", lq=num_q)


def _attend_block_backward(q, k, v, out, lse, grad_out, grad_lse, scale, causal):
    """Gradients of q, k and v for _attend_block from its own out and lse, as FlashAttention's backward: the
    probabilities come back from the scores and lse (no softmax to differentiate), and the softmax's row term is
    sum(grad_out * out)."""
    num_q, num_heads_kv = q.shape[0], k.shape[1]

    def grouped(t):
        return rearrange(t, "lq (hkv g) ... -> hkv (g lq) ...", hkv=num_heads_kv)

    probs = torch.exp(_grouped_scores(q, k, scale, causal) - grouped(lse).unsqueeze(-1))
    grad_out_grouped = grouped(grad_out)
    grad_v = torch.bmm(probs.transpose(1, 2), grad_out_grouped)
    grad_probs = torch.bmm(grad_out_grouped, rearrange(v, "lk hkv d -> hkv d lk"))
    row_term = (grad_out_grouped * grouped(out)).sum(-1)
    if grad_lse is not None:  # d lse / d scores = probs
        row_term = row_term - grouped(grad_lse)
    grad_scores = probs * (grad_probs - row_term.unsqueeze(-1)) * scale
    grad_q = torch.bmm(grad_scores, rearrange(k, "lk hkv d -> hkv lk d"))
    grad_k = torch.bmm(grad_scores.transpose(1, 2), grouped(q))
    return (
        rearrange(grad_q, "hkv (g lq) d -> lq (hkv g) d", lq=num_q),
        rearrange(grad_k, "hkv lk d -> lk hkv d"),
        rearrange(grad_v, "hkv lk d -> lk hkv d"),
    )


def _torch_blocks(key):
    """The torch kernel's blocks: each query range in blocks of at most chunk_size queries (so no block scores more
    than chunk x sample pairs), against the keys of its sample up to the block's end (if causal). Yields slices of
    the local queries and of the global keys."""
    for r in key.plan.query_ranges:
        for offset in range(0, r.length, key.chunk_size):
            num_q = min(key.chunk_size, r.length - offset)
            q_start = r.local_start + offset
            yield slice(q_start, q_start + num_q), slice(r.sample_start, r.key_end(key.causal, offset + num_q))


def _attend_torch(q, k_gathered, v_gathered, key, scale):
    """Matmuls, any device, in float32 at least (autocast off: the backward recomputes the probabilities from lse,
    and they must be the forward's), block by block (_torch_blocks)."""
    plan = key.plan
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    to_global = plan.global_to_dispatch.to(q.device)
    with torch.autocast(q.device.type, enabled=False):
        k_global = k_gathered.index_select(0, to_global).to(compute_dtype)
        v_global = v_gathered.index_select(0, to_global).to(compute_dtype)
        q_compute = q.to(compute_dtype)
        outs, lses = [q_compute.new_zeros((0, *q.shape[1:]))], [q_compute.new_zeros((0, q.shape[1]))]
        for queries, keys in _torch_blocks(key):
            out, lse = _attend_block(q_compute[queries], k_global[keys], v_global[keys], scale, key.causal)
            outs.append(out)
            lses.append(lse)
    out, lse = _with_pad_tail(outs, lses, plan.num_local_pad)
    return out.to(q.dtype), lse


def _attend_torch_backward(q, k_gathered, v_gathered, out, lse, grad_out, grad_lse, key, scale):
    """_attend_torch's gradients from its out and lse, block by block (_attend_block_backward)."""
    plan = key.plan
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    to_global = plan.global_to_dispatch.to(q.device)
    with torch.autocast(q.device.type, enabled=False):
        k_global = k_gathered.index_select(0, to_global).to(compute_dtype)
        v_global = v_gathered.index_select(0, to_global).to(compute_dtype)
        q_c, out_c, grad_out_c = (t.to(compute_dtype) for t in (q, out, grad_out))
        grad_q, grad_k_global, grad_v_global = (torch.zeros_like(t) for t in (q_c, k_global, v_global))
        for queries, keys in _torch_blocks(key):
            block_grad_lse = None if grad_lse is None else grad_lse[queries]
            block_q, block_k, block_v = _attend_block_backward(
                q_c[queries], k_global[keys], v_global[keys], out_c[queries], lse[queries], grad_out_c[queries],
                block_grad_lse, scale, key.causal,
            )
            grad_q[queries] = block_q
            grad_k_global[keys] += block_k
            grad_v_global[keys] += block_v
    # The gathered K/V were put in global order by to_global, a permutation: its inverse is the dispatch order.
    to_gathered = plan.dispatch_order.to(q.device)
    return (grad_q.to(q.dtype), grad_k_global.index_select(0, to_gathered).to(k_gathered.dtype),
            grad_v_global.index_select(0, to_gathered).to(v_gathered.dtype))


@functools.cache
def _fa4_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FlashAttention-4 cannot take tensors of this device and dtype, or None if it can."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return "it runs on Hopper and Blackwell GPUs (compute capability 9.x or 10.x) only"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16 or fp16, got {dtype}"
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "flash_attn.cute is not installed (pip install -r requirements-gpu.txt)"
    return None


# FlashAttention-4 exports its forward and backward only as one autograd function (flash_attn_varlen_func); the
# backward from a kept out and lse needs the two halves, which it calls _flash_attn_fwd and _flash_attn_bwd.
def _fa4_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    """FlashAttention-4's varlen kernel: batch i is queries [cu_q[i], cu_q[i+1]) against keys [cu_k[i], cu_k[i+1]),
    causal bottom-right aligned. Returns out like q and lse [heads, tokens] (FA4's varlen layout), as
    flash_attn_varlen_func(..., return_lse=True) does."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, softmax_scale=scale, causal=causal, return_lse=True,
    )[:2]
    return out, lse


def _fa4_varlen_backward(q, k, v, out, lse, grad_out, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, causal):
    """FlashAttention-4's varlen backward, as flash_attn_varlen_func's own backward calls it; lse and grad_lse in
    FA4's layout [heads, tokens]. Returns (dq, dk, dv)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    return _flash_attn_bwd(
        q, k, v, out, grad_out, lse, scale, causal, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dlse=grad_lse,
    )[:3]


def _fa4_ranges(k_gathered, v_gathered, plan):
    """Each query range's own copy of its keys (its sample's, up to its end if causal), laid end to end: with GQA,
    K/V are a fraction of Q's size, and a copy lets ranges of one sample share keys, which FA4's varlen layout cannot
    (its backward writes each range's dK in place). At CP 1 the keys are the first local tokens, in order: no copy."""
    if plan.key_index is None:
        return (t.split([plan.num_keys, len(t) - plan.num_keys])[0] for t in (k_gathered, v_gathered))
    return (t.index_select(0, plan.key_index) for t in (k_gathered, v_gathered))


def _attend_fa4(q, k_gathered, v_gathered, key, scale):
    """One FlashAttention-4 call for all of this rank's query ranges (_fa4_ranges); the pad tail gets zeros."""
    plan = key.plan
    k_ranges, v_ranges = _fa4_ranges(k_gathered, v_gathered, plan)
    out, lse = _fa4_varlen_forward(
        q[: q.shape[0] - plan.num_local_pad], k_ranges, v_ranges, plan.cu_seqlens_q, plan.cu_seqlens_k,
        plan.max_seqlen_q, plan.max_seqlen_k, scale, key.causal,
    )
    return _with_pad_tail([out], [lse.T], plan.num_local_pad)


def _attend_fa4_backward(q, k_gathered, v_gathered, out, lse, grad_out, grad_lse, key, scale):
    """_attend_fa4's gradients from its out and lse: FA4's backward, then the gradients of the key copies added up
    per gathered token (those of keys that several ranges share), zeros for the pad tail."""
    plan = key.plan
    num_valid = q.shape[0] - plan.num_local_pad
    k_ranges, v_ranges = _fa4_ranges(k_gathered, v_gathered, plan)
    grad_q, grad_k_ranges, grad_v_ranges = _fa4_varlen_backward(
        q[:num_valid], k_ranges, v_ranges, out[:num_valid], lse[:num_valid].T.contiguous(), grad_out[:num_valid],
        None if grad_lse is None else grad_lse[:num_valid].T.contiguous(), plan.cu_seqlens_q, plan.cu_seqlens_k,
        plan.max_seqlen_q, plan.max_seqlen_k, scale, key.causal,
    )
    grad_q = torch.cat([grad_q, grad_q.new_zeros((plan.num_local_pad, *grad_q.shape[1:]))])
    if plan.key_index is None:
        grad_k, grad_v = (torch.cat([g, g.new_zeros((len(t) - len(g), *g.shape[1:]))])
                          for g, t in ((grad_k_ranges, k_gathered), (grad_v_ranges, v_gathered)))
    else:
        grad_k, grad_v = (torch.zeros_like(t).index_add_(0, plan.key_index, g)
                          for g, t in ((grad_k_ranges, k_gathered), (grad_v_ranges, v_gathered)))
    return grad_q, grad_k, grad_v


# The kernels that run as the operator below: a forward that returns (out, lse) and a backward from them.
_OP_KERNELS = {"fa4": (_attend_fa4, _attend_fa4_backward), "torch": (_attend_torch, _attend_torch_backward)}
_keys_by_id: "weakref.WeakValueDictionary[int, DistAttnRuntimeKey]" = weakref.WeakValueDictionary()


@torch.library.custom_op("magi_portable::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_id: int, kernel: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of this rank's queries against the gathered K/V, as one operator that torch's dispatcher sees:
    activation checkpointing can keep its outputs and skip it in the recomputation (long_context.py), since its
    backward needs only its inputs and outputs. An operator's arguments cannot be a key: key_id names one."""
    forward, _ = _OP_KERNELS[kernel]
    return forward(q, k, v, _keys_by_id[key_id], scale)


def _attention_op_setup_context(ctx, inputs, output):
    q, k, v, key_id, kernel, scale = inputs
    ctx.key, ctx.kernel, ctx.scale = _keys_by_id[key_id], kernel, scale
    ctx.save_for_backward(q, k, v, *output)
    ctx.set_materialize_grads(False)  # no gradient of lse (the usual case) comes as None, not as zeros


def _attention_op_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    _, backward = _OP_KERNELS[ctx.kernel]
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    return (*backward(q, k, v, out, lse, grad_out, grad_lse, ctx.key, ctx.scale), None, None, None)


_attention_op.register_autograd(_attention_op_backward, setup_context=_attention_op_setup_context)


_compiled_flex_attention = None  # compiled once per process, shared by all keys


def _flex_attention_with_lse(q, k, v, block_mask, scale):
    """FlexAttention returning (out, lse); torch >= 2.9 reports lse through return_aux."""
    global _compiled_flex_attention
    from torch.nn.attention import flex_attention as flex

    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex.flex_attention)
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=True)
    if hasattr(flex, "AuxRequest"):
        out, aux = _compiled_flex_attention(q, k, v, return_aux=flex.AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return _compiled_flex_attention(q, k, v, return_lse=True, **kwargs)


def _flex_block_mask(key, device):
    """FlexAttention BlockMask of this rank's queries against all gathered keys (left in dispatch order), masked per
    token. Built once per key and kept on its plan: building it evaluates the mask over every block."""
    from torch.nn.attention.flex_attention import create_block_mask

    plan = key.plan
    if plan.block_mask is None:
        q_pos = plan.local_token_index.to(device)
        k_pos = plan.dispatch_order.to(device)
        # Sample ids; pad tokens get -1 as queries and -2 as keys, so they see nothing and nothing sees them.
        q_sample = plan.token_sample_id.to(device)[q_pos]
        k_sample = plan.token_sample_id.to(device)[k_pos]
        k_sample = torch.where(k_sample < 0, -2, k_sample)
        causal = key.causal

        def mask_mod(batch, head, q_idx, kv_idx):
            same_sample = q_sample[q_idx] == k_sample[kv_idx]
            return same_sample & (k_pos[kv_idx] <= q_pos[q_idx]) if causal else same_sample

        plan.block_mask = create_block_mask(
            mask_mod, B=None, H=None, Q_LEN=len(q_pos), KV_LEN=len(k_pos), device=device, _compile=True
        )
    return plan.block_mask


def _attend_flex(q, k_gathered, v_gathered, key, scale):
    q, k, v = (rearrange(t, "l h d -> 1 h l d") for t in (q, k_gathered, v_gathered))
    out, lse = _flex_attention_with_lse(q, k, v, _flex_block_mask(key, q.device), scale)
    return rearrange(out, "1 h l d -> l h d"), rearrange(lse, "1 h l -> l h")


def _sdpa_with_lse(q, k, v, scale, causal):
    """All of q against all of k/v ([1, heads, tokens, d]), causal or full, through the kernel that SDPA itself picks
    for these tensors, called directly because SDPA does not return the lse. cuDNN and FlashAttention-2 return it
    and have a backward; for any other pick this returns None."""
    from torch.nn.attention import SDPBackend

    backend = torch._fused_sdp_choice(q, k, v, None, 0.0, causal, scale=scale, enable_gqa=True)
    if backend == SDPBackend.CUDNN_ATTENTION.value:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )[:2]
    elif backend == SDPBackend.FLASH_ATTENTION.value:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        return None
    return out, lse.reshape(q.shape[:3])  # cuDNN's lse is [b, h, tokens, 1]


def _sdpa_per_sample(q, k, v, key, scale):
    """CP 1: every sample is whole on this rank, so each one is a plain causal or full attention, run by the kernel
    SDPA itself picks (cuDNN on Hopper); the pad tail gets zeros and an lse of -inf. q/k/v are [tokens, heads, d].
    None where SDPA's pick does not return the lse."""
    # split, not slicing: the backward of a slice would build a zero gradient the size of q for every sample.
    lengths = [r.length for r in key.plan.query_ranges] + [key.plan.num_local_pad]
    q_parts, k_parts, v_parts = (rearrange(t, "l h d -> 1 h l d").split(lengths, dim=2) for t in (q, k, v))
    outs, lses = [], []
    for i in range(len(lengths) - 1):
        result = _sdpa_with_lse(q_parts[i], k_parts[i], v_parts[i], scale, key.causal)
        if result is None:
            return None
        outs.append(rearrange(result[0], "1 h l d -> l h d"))
        lses.append(rearrange(result[1], "1 h l -> l h"))
    return _with_pad_tail(outs, lses, key.plan.num_local_pad)


def _pick_kernel(q, key) -> str:
    """The kernel MAGI_ATTENTION_KERNEL_BACKEND names, checked; or by default the fastest that can run here:
    FlashAttention-4, else at CP 1 SDPA's kernel per sample (where samples average at least DEFAULT_MAX_CHUNK_SIZE
    tokens: for shorter ones a launch per sample likely costs more, not measured), else FlexAttention; on CPU, torch."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: use one of {', '.join(KERNELS)}.")
    if choice == "auto":
        if not q.is_cuda:
            return "torch"
        if _fa4_unavailable(q.device, q.dtype) is None:
            return "fa4"
        whole_samples = key.cp_size == 1 and key.total_seqlen >= len(key.plan.query_ranges) * DEFAULT_MAX_CHUNK_SIZE
        return "sdpa" if whole_samples else "flex"
    reason = _fa4_unavailable(q.device, q.dtype) if choice == "fa4" else None
    if reason is not None:
        raise RuntimeError(f"{KERNEL_ENV}=fa4, but FlashAttention-4 cannot run: {reason}.")
    if choice in ("sdpa", "flex") and not q.is_cuda:
        raise RuntimeError(f"{KERNEL_ENV}={choice} needs a CUDA device; unset it to use the torch kernel.")
    if choice == "sdpa" and key.cp_size > 1:
        raise RuntimeError(f"{KERNEL_ENV}=sdpa runs whole samples, at CP 1 only; this key has CP {key.cp_size}.")
    return choice


def calc_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key: DistAttnRuntimeKey,
    sink: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, AttnForwardMeta]:
    """Attention of this rank's queries q [local_tokens, heads_q, d] to the keys their mask allows,
    with k/v [local_tokens, heads_kv, d] sharded the same way. Returns (out like q, meta.lse)."""
    if sink is not None or softcap != 0.0:
        raise NotImplementedError("magi_portable.calc_attn supports neither attention sinks nor softcap")
    expected_q = (key.num_local_tokens, key.num_heads_q, key.head_dim)
    expected_kv = (key.num_local_tokens, key.num_heads_kv, key.head_dim)
    if q.shape != expected_q or k.shape != expected_kv or v.shape != expected_kv:
        got = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        raise ValueError(f"calc_attn expects q {expected_q} and k/v {expected_kv}, got {got}")
    scale = key.head_dim**-0.5 if softmax_scale is None else softmax_scale
    kernel = _pick_kernel(q, key)

    if key.cp_size > 1:
        # One all-gather for K and V together; its backward reduce-scatters dK/dV to their owners.
        kv = _GatherKV.apply(torch.cat([k, v], dim=1), key.cp_group)
        k, v = kv.split(key.num_heads_kv, dim=1)

    result = _sdpa_per_sample(q, k, v, key, scale) if kernel == "sdpa" else None
    if kernel == "sdpa" and result is None:
        if os.environ.get(KERNEL_ENV, "auto") == "sdpa":
            raise RuntimeError(f"{KERNEL_ENV}=sdpa, but SDPA picks a kernel that does not return the lse here.")
        kernel = "flex"
    if kernel == "flex":
        result = _attend_flex(q, k, v, key, scale)
    elif result is None:
        _keys_by_id[id(key)] = key
        result = _attention_op(q, k, v, id(key), kernel, scale)
    if kernel not in _logged_kernels:
        _logged_kernels.add(kernel)
        logger.info(f"calc_attn runs the {kernel} kernel ({q.device.type}, {q.dtype}, CP {key.cp_size})")
    out, lse = result
    return out.to(q.dtype), AttnForwardMeta(lse=lse.to(torch.promote_types(q.dtype, torch.float32)))
