"""Portable stand-in for the subset of ``magi_attention.api`` (v1.1.x) this project uses.

Plain PyTorch + torch.distributed: runs on CPU (gloo) and GPU (NCCL), no Hopper kernels.
Same names, signatures and meaning as the real API, so callers can import either module.

How it works
- Planning (once per key): the padded token stream is cut into chunks of ``chunk_size``; every
  rank gets the same number of chunks, assigned greedily (largest attention area first, to the
  least-loaded rank with room) so each rank's queries cover about the same mask area.
- ``dispatch`` / ``undispatch`` move tokens between the global order and the rank-local order.
- ``calc_attn`` all-gathers K and V over the CP group (its backward reduce-scatters dK/dV), then
  computes exact masked attention of the local queries against all keys: a chunked matmul path
  on CPU; on CUDA, SDPA's own kernel (cuDNN on Hopper) per sample at CP 1, else compiled FlexAttention
  with a block mask cached on the key (bench/attention.py measures both on a GPU).

Communication per attention layer, per rank, with S padded tokens, h_kv key/value heads, head
size d and b bytes per element: forward all-gathers (cp-1)/cp * S * 2 * h_kv * d * b bytes;
backward reduce-scatters the same amount of dK/dV. Ring attention passes the same K/V volume
around the ring in cp-1 steps and overlaps it with compute; the all-gather is simpler but does
not overlap and briefly holds all of K/V on every rank. MagiAttention sends only the ranges each
rank needs. With GQA, K/V are h_kv/h_q of Q's size, so the gathered volume stays small.
"""

import atexit
import bisect
import heapq
import math
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
    batch_size: int, seq_len: int, device: str = "cpu"
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


def assign_chunks(
    cu_seqlens: list[int], causal: bool, chunk_size: int, cp_size: int, padded_total_seqlen: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Greedy min-heap load balancing of equal-size chunks over CP ranks.

    Returns (chunk ids of each rank in ascending order, attention area of each rank)."""
    num_chunks = padded_total_seqlen // chunk_size
    chunks_per_rank = num_chunks // cp_size
    chunk_areas = token_attn_areas(cu_seqlens, causal, padded_total_seqlen)
    chunk_areas = chunk_areas.view(num_chunks, chunk_size).sum(1).tolist()

    rank_chunks = [[] for _ in range(cp_size)]
    rank_areas = [0] * cp_size
    heap = [(0, rank) for rank in range(cp_size)]  # (area so far, rank); only ranks with room
    for chunk in sorted(range(num_chunks), key=lambda c: -chunk_areas[c]):
        area, rank = heapq.heappop(heap)
        rank_chunks[rank].append(chunk)
        rank_areas[rank] = area + chunk_areas[chunk]
        if len(rank_chunks[rank]) < chunks_per_rank:
            heapq.heappush(heap, (rank_areas[rank], rank))
    return tuple(tuple(sorted(chunks)) for chunks in rank_chunks), tuple(rank_areas)


def area_imbalance(rank_areas: tuple[int, ...]) -> float:
    """Busiest rank's attention area / mean area (1.0 is perfect balance)."""
    mean_area = sum(rank_areas) / len(rank_areas)
    return max(rank_areas) / mean_area if mean_area > 0 else 1.0


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
    # CPU path: (local query start, length, first key, key end) per block of local queries
    query_blocks: list[tuple[int, int, int, int]]
    num_local_pad: int
    block_mask: object = None  # FlexAttention BlockMask, built on first CUDA call


def _build_plan(cu_seqlens, causal, chunk_size, padded_total, group, device) -> _Plan:
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    total = cu_seqlens[-1]
    rank_chunks, rank_areas = assign_chunks(cu_seqlens, causal, chunk_size, cp_size, padded_total)

    def token_index(chunks):
        return (torch.tensor(chunks).unsqueeze(1) * chunk_size + torch.arange(chunk_size)).flatten()

    dispatch_order = torch.cat([token_index(chunks) for chunks in rank_chunks])
    lengths = torch.tensor(cu_seqlens[1:]) - torch.tensor(cu_seqlens[:-1])
    sample_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)

    # Query blocks: each maximal run of consecutive local chunks, cut at sample borders and into
    # pieces of at most chunk_size queries, so no block ever scores more than chunk x seq pairs.
    query_blocks, local_start, num_local_pad = [], 0, 0
    my_chunks = rank_chunks[cp_rank]
    run_starts = [i for i, c in enumerate(my_chunks) if i == 0 or my_chunks[i - 1] != c - 1]
    for i, run_start in enumerate(run_starts):
        run_end = run_starts[i + 1] if i + 1 < len(run_starts) else len(my_chunks)
        begin = my_chunks[run_start] * chunk_size
        end = (my_chunks[run_end - 1] + 1) * chunk_size
        num_local_pad += max(0, end - max(begin, total))
        first_sample = bisect.bisect_right(cu_seqlens, begin) - 1
        for seq_start, seq_end in zip(cu_seqlens[first_sample:-1], cu_seqlens[first_sample + 1 :]):
            if seq_start >= end:
                break
            for q_start in range(max(begin, seq_start), min(end, seq_end), chunk_size):
                q_end = min(q_start + chunk_size, end, seq_end)
                query_blocks.append(
                    (local_start + q_start - begin, q_end - q_start, seq_start, q_end if causal else seq_end)
                )
        local_start += end - begin
    # Pad tokens sit at the global end, so they form the tail of every rank's local tokens.
    assert sum(block[1] for block in query_blocks) + num_local_pad == local_start

    return _Plan(
        cp_size=cp_size,
        cp_rank=cp_rank,
        rank_chunks=rank_chunks,
        rank_areas=rank_areas,
        local_token_index=token_index(my_chunks).to(device),
        dispatch_order=dispatch_order.to(device),
        global_to_dispatch=torch.argsort(dispatch_order).to(device),
        token_sample_id=torch.cat([sample_id, sample_id.new_full((padded_total - total,), -1)]).to(device),
        query_blocks=query_blocks,
        num_local_pad=num_local_pad,
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


def _all_gather_cat(x: torch.Tensor, key: DistAttnRuntimeKey) -> torch.Tensor:
    """Concatenation of every rank's x in rank order (plain collective, no autograd)."""
    if key.cp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(key.cp_size)]
    dist.all_gather(parts, x.contiguous(), group=key.cp_group)
    return torch.cat(parts)


class _GatherKV(torch.autograd.Function):
    """All-gather along the token dim; backward reduce-scatters the gradient to its owner.
    (torch.distributed.nn.functional.all_gather does the same, but its gloo backward
    falls back to a scatter that breaks on groups without global rank 0.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad = grad_out.new_empty((grad_out.shape[0] // dist.get_world_size(ctx.group), *grad_out.shape[1:]))
        dist.reduce_scatter_tensor(grad, grad_out.contiguous(), group=ctx.group)
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
        grad_gathered = _all_gather_cat(grad_local, ctx.key)
        return grad_gathered.index_select(0, plan.global_to_dispatch.to(grad_local.device)), None


class _Undispatch(torch.autograd.Function):
    """Rebuild the global tensor on every rank. Its adjoint is _Dispatch's forward: each rank
    keeps the gradient of its own tokens, no sum (every rank computes the same global loss)."""

    @staticmethod
    def forward(ctx, x_local, key):
        ctx.key = key
        gathered = _all_gather_cat(x_local, key)
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


def _attend_block(q, k, v, scale, causal):
    """Exact attention of q [lq, hq, d] to k/v [lk, hkv, d]; causal is bottom-right aligned.
    Grouped-query heads share a kv head without copying it: q head h uses kv head h // group."""
    num_q, num_heads_q, _ = q.shape
    num_k, num_heads_kv, _ = k.shape
    q_grouped = rearrange(q, "lq (hkv g) d -> hkv (g lq) d", hkv=num_heads_kv)
    scores = torch.bmm(q_grouped, rearrange(k, "lk hkv d -> hkv d lk")) * scale
    if causal:
        last_visible_key = torch.arange(num_q, device=q.device)[:, None] + (num_k - num_q)
        allowed = torch.arange(num_k, device=q.device) <= last_visible_key
        scores = scores.view(num_heads_kv, -1, num_q, num_k).masked_fill(~allowed, -math.inf).flatten(1, 2)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.bmm(torch.exp(scores - lse.unsqueeze(-1)), rearrange(v, "lk hkv d -> hkv lk d"))
    out = rearrange(out, "hkv (g lq) d -> lq (hkv g) d", lq=num_q)
    return out, rearrange(lse, "hkv (g lq) -> lq (hkv g)", lq=num_q)


def _attend_matmul(q, k_gathered, v_gathered, key, scale):
    """CPU path: per block of local queries, the keys of its sample up to its end (if causal)."""
    plan = key.plan
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    to_global = plan.global_to_dispatch.to(q.device)
    k_global = k_gathered.index_select(0, to_global).to(compute_dtype)
    v_global = v_gathered.index_select(0, to_global).to(compute_dtype)
    q = q.to(compute_dtype)
    outs, lses = [], []
    for q_start, q_len, k_start, k_end in plan.query_blocks:
        out, lse = _attend_block(
            q[q_start : q_start + q_len], k_global[k_start:k_end], v_global[k_start:k_end], scale, key.causal
        )
        outs.append(out)
        lses.append(lse)
    outs.append(q.new_zeros((plan.num_local_pad, *q.shape[1:])))
    lses.append(q.new_full((plan.num_local_pad, q.shape[1]), -math.inf))
    return torch.cat(outs), torch.cat(lses)


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
        if key.cp_size == 1:
            # Queries and keys are both in global order: the indices are the positions (the usual document mask,
            # two gathers per score instead of four).
            def mask_mod(batch, head, q_idx, kv_idx):
                same_sample = q_sample[q_idx] == k_sample[kv_idx]
                return same_sample & (kv_idx <= q_idx) if causal else same_sample
        else:
            def mask_mod(batch, head, q_idx, kv_idx):
                same_sample = q_sample[q_idx] == k_sample[kv_idx]
                return same_sample & (k_pos[kv_idx] <= q_pos[q_idx]) if causal else same_sample

        plan.block_mask = create_block_mask(
            mask_mod, B=None, H=None, Q_LEN=len(q_pos), KV_LEN=len(k_pos), device=device, _compile=True
        )
    return plan.block_mask


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
    SDPA itself picks (cuDNN on Hopper); the pad tail gets zeros and an lse of -inf. None where SDPA's pick does not
    return the lse, or where the samples average under DEFAULT_MAX_CHUNK_SIZE tokens: there a launch per sample
    would likely cost more than one FlexAttention call (measured only with samples of 459 to 8192 tokens)."""
    num_samples = len(key.cu_seqlens) - 1
    if num_samples == 1 and key.pad_size == 0:
        return _sdpa_with_lse(q, k, v, scale, key.causal)
    if key.total_seqlen < num_samples * DEFAULT_MAX_CHUNK_SIZE:
        return None
    # split, not slicing: the backward of a slice would build a zero gradient the size of q for every sample.
    lengths = [end - start for start, end in zip(key.cu_seqlens[:-1], key.cu_seqlens[1:])] + [key.pad_size]
    q_parts, k_parts, v_parts = (t.split(lengths, dim=2) for t in (q, k, v))
    outs, lses = [], []
    for i in range(num_samples):
        if lengths[i] == 0:
            continue
        result = _sdpa_with_lse(q_parts[i], k_parts[i], v_parts[i], scale, key.causal)
        if result is None:
            return None
        outs.append(result[0])
        lses.append(result[1])
    outs.append(q.new_zeros((*q.shape[:2], key.pad_size, q.shape[3])))
    lses.append(lses[0].new_full((*q.shape[:2], key.pad_size), -math.inf))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attend_cuda(q, k_gathered, v_gathered, key, scale):
    """CUDA path. At CP 1, SDPA's own kernel per sample: cuDNN on Hopper (H100, fwd+bwd, d 64: causal 8192 at 404
    TFLOP/s against 257 for compiled FlexAttention, 8 causal documents in 32768 tokens at 311 against 243). At CP > 1,
    where a rank's chunks cut samples apart, compiled FlexAttention with the key's cached block mask."""
    q, k, v = (rearrange(t, "l h d -> 1 h l d") for t in (q, k_gathered, v_gathered))
    result = _sdpa_per_sample(q, k, v, key, scale) if key.cp_size == 1 else None
    if result is None:
        result = _flex_attention_with_lse(q, k, v, _flex_block_mask(key, q.device), scale)
    out, lse = result
    return rearrange(out, "1 h l d -> l h d"), rearrange(lse, "1 h l -> l h")


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

    if key.cp_size > 1:
        # One all-gather for K and V together; its backward reduce-scatters dK/dV to their owners.
        kv = _GatherKV.apply(torch.cat([k, v], dim=1), key.cp_group)
        k, v = kv.split(key.num_heads_kv, dim=1)

    attend = _attend_cuda if q.is_cuda else _attend_matmul
    out, lse = attend(q, k, v, key, scale)
    return out.to(q.dtype), AttnForwardMeta(lse=lse.to(torch.promote_types(q.dtype, torch.float32)))
