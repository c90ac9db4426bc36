"""Portable stand-in for the subset of ``magi_attention.api`` (v1.1.x) this project uses: this module is that API.

Plain PyTorch + torch.distributed: runs on CPU (gloo) and GPU (NCCL); on Hopper and Blackwell GPUs its attention
kernel is FlashAttention-4 when that is installed. The names and meanings are the real API's, so callers can import
either module. Differences from the real API: ``magi_attn_varlen_key`` takes ``pad_size`` and ``chunk_size`` as
v1.1.0 did (v1.1.1 deprecates them) and only self-attention without sliding windows; ``calc_attn`` has no
``return_max_logits``, sinks or softcap; ``DistAttnConfig`` options are accepted and ignored.

One job a module:
- planning.py: which chunks of the padded token stream each rank holds, balanced by attention area;
- key.py: the key of a setup and its plan, cached per setup (``magi_attn_varlen_key``, ``get_position_ids``);
- collectives.py: ``dispatch`` / ``undispatch`` between the global and the rank-local order, and the K/V all-gather;
- attention.py: ``calc_attn`` and the choice of its kernel (MAGI_ATTENTION_KERNEL_BACKEND forces one; the first
  call logs which one runs);
- kernels/: fa4 (FlashAttention-4's varlen kernel, one call for all of a rank's query ranges; CUDA, Hopper or
  Blackwell, bf16/fp16), sdpa (the kernel SDPA picks, once per sample, at CP 1), flex (compiled FlexAttention;
  CUDA), torch (matmuls per block of queries; any device, the CPU's kernel).

Communication per attention layer, per rank, with S padded tokens, h_kv key/value heads, head
size d and b bytes per element: forward all-gathers (cp-1)/cp * S * 2 * h_kv * d * b bytes;
backward reduce-scatters the same amount of dK/dV. Ring attention passes the same K/V volume
around the ring in cp-1 steps and overlaps it with compute; the all-gather is simpler but does
not overlap and briefly holds all of K/V on every rank. MagiAttention sends only the ranges each
rank needs. With GQA, K/V are h_kv/h_q of Q's size, so the gathered volume stays small.
"""

from .attention import KERNEL_ENV, AttnForwardMeta, calc_attn
from .collectives import dispatch, undispatch
from .key import DistAttnRuntimeKey, get_position_ids, magi_attn_varlen_key
from .planning import compute_pad_size, default_chunk_size, infer_varlen_mask_from_batch

__all__ = [
    "AttnForwardMeta",
    "DistAttnRuntimeKey",
    "KERNEL_ENV",
    "calc_attn",
    "compute_pad_size",
    "default_chunk_size",  # v1.1.1's default chunk size, which the real API does not export
    "dispatch",
    "get_position_ids",
    "infer_varlen_mask_from_batch",
    "magi_attn_varlen_key",
    "undispatch",
]
