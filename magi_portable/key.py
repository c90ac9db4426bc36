"""The key: a hashable description of one distributed attention setup, with its plan, cached per setup."""

import atexit
import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .planning import Plan, area_imbalance, build_plan, compute_pad_size, default_chunk_size

logger = logging.getLogger(__name__)
_MAX_CACHED_KEYS = 100  # like the real library's runtime dict: varlen batches change every step


@dataclass(frozen=True)
class DistAttnRuntimeKey:
    """Hashable description of one distributed attention setup; carries its plan."""

    cu_seqlens: tuple[int, ...]
    causal: bool
    num_heads_q: int
    num_heads_kv: int
    head_dim: int
    pad_size: int
    chunk_size: int
    cp_group: dist.ProcessGroup
    plan: Plan = field(default=None, compare=False, repr=False)

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
        """Busiest rank's attention area / mean area (not in the real API)."""
        return area_imbalance(self.plan.rank_areas)


_cached_keys: "OrderedDict[DistAttnRuntimeKey, DistAttnRuntimeKey]" = OrderedDict()


@atexit.register
def _release_cached_keys():
    """The cached keys hold their CP process groups, and destroy_process_group() leaves a gloo group's threads
    running while anything holds it. Let go of the groups while the interpreter is alive: joined during its
    shutdown, those threads can abort a finished run (SIGABRT, "terminate called without an active exception")."""
    _cached_keys.clear()


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
    """Key for varlen self-attention: sample i is tokens [cu[i], cu[i+1]), causal or full. The same arguments give
    the same key object (the last 100 are cached), so a batch of the same shape reuses its plan."""
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

    group = cp_group_or_mesh
    cp_size, total = dist.get_world_size(group), cu_seqlens[-1]
    if chunk_size is None:
        chunk_size = default_chunk_size(total, cp_size)
    if pad_size < 0 or (total + pad_size) % (cp_size * chunk_size) != 0:
        raise ValueError(
            f"pad_size={pad_size} does not make total_seqlen={total} a multiple of cp_size * chunk_size = "
            f"{cp_size} * {chunk_size}; use compute_pad_size({total}, {cp_size}, {chunk_size}) = "
            f"{compute_pad_size(total, cp_size, chunk_size)}"
        )

    key = DistAttnRuntimeKey(
        tuple(cu_seqlens), bool(causal), num_heads_q, num_heads_kv, head_dim, pad_size, chunk_size, group
    )
    cached = _cached_keys.pop(key, None)
    if cached is None:
        plan = build_plan(cu_seqlens, key.causal, chunk_size, total + pad_size, cp_size, dist.get_rank(group),
                          cu_seqlens_q.device)
        cached = replace(key, plan=plan)
        logger.debug(f"A new plan: {len(cu_seqlens) - 1} sequences, {total} tokens in chunks of {chunk_size} over "
                     f"{cp_size} ranks; busiest rank's attention area / mean: {cached.attn_area_imbalance:.3f}")
    _cached_keys[cached] = cached  # (re)inserted last: least recently used keys go first
    if len(_cached_keys) > _MAX_CACHED_KEYS:
        _cached_keys.popitem(last=False)
    return cached


def get_position_ids(key: DistAttnRuntimeKey) -> torch.Tensor:
    """Global index of each local token; pad tokens are clamped to the last valid index."""
    return key.plan.local_token_index.clamp(max=max(key.total_seqlen - 1, 0))
