"""The fa4 kernel: FlashAttention-4's varlen kernel, one call forward and one backward for all of a rank's query ranges
(CUDA, Hopper or Blackwell, bf16/fp16).

Each query range gets its own copy of its keys (its sample's, up to its end if causal), laid end to end: with GQA,
K/V are a fraction of Q's size, and a copy lets ranges of one sample share keys, which FA4's varlen layout cannot
(its backward writes each range's dK in place). The backward adds up the gradients of shared keys.
"""

import functools
import importlib.util
import weakref
from dataclasses import dataclass

import torch

from . import with_pad_tail


@functools.cache
def _unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return "it runs on Hopper and Blackwell GPUs (compute capability 9.x or 10.x) only"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16 or fp16, got {dtype}"
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "flash_attn.cute is not installed (pip install -r requirements-gpu.txt)"
    return None


def unavailable(q, k, v, key):
    return _unavailable(q.device, q.dtype)


@dataclass(frozen=True)
class Layout:
    """The varlen call's layout for one key: batch i is query range i against its copy of keys."""

    key_index: torch.Tensor | None  # positions of the copies in the gathered K/V; None: the first num_keys, in order
    cu_seqlens_q: torch.Tensor  # int32, over the query ranges
    cu_seqlens_k: torch.Tensor  # int32, over their keys
    max_seqlen_q: int
    max_seqlen_k: int
    num_keys: int


_layouts: "weakref.WeakKeyDictionary[object, Layout]" = weakref.WeakKeyDictionary()  # by plan, while it lives


def layout(key) -> Layout:
    plan = key.plan
    if plan not in _layouts:
        device = plan.global_to_dispatch.device
        to_dispatch = plan.global_to_dispatch.cpu()
        key_ranges = [(r.sample_start, r.key_end(key.causal)) for r in plan.query_ranges]
        query_lengths, key_lengths = [r.length for r in plan.query_ranges], [end - start for start, end in key_ranges]
        key_index = torch.cat([torch.zeros(0, dtype=torch.long), *(to_dispatch[s:e] for s, e in key_ranges)])

        def cumulative(lengths):
            return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

        _layouts[plan] = Layout(
            # At CP 1 the keys are the first local tokens, in order: no copy.
            key_index=None if torch.equal(key_index, torch.arange(len(key_index))) else key_index.to(device),
            cu_seqlens_q=cumulative(query_lengths),
            cu_seqlens_k=cumulative(key_lengths),
            max_seqlen_q=max(query_lengths, default=0),
            max_seqlen_k=max(key_lengths, default=0),
            num_keys=sum(key_lengths),
        )
    return _layouts[plan]


# FlashAttention-4 exports its forward and backward only as one autograd function (flash_attn_varlen_func); a
# backward from a kept out and lse needs the two halves, which it calls _flash_attn_fwd and _flash_attn_bwd.
def _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    """FlashAttention-4's varlen kernel: batch i is queries [cu_q[i], cu_q[i+1]) against keys [cu_k[i], cu_k[i+1]),
    causal bottom-right aligned. Returns out like q and lse [heads, tokens] (FA4's varlen layout), as
    flash_attn_varlen_func(..., return_lse=True) does."""
    from flash_attn.cute.interface import _flash_attn_fwd

    return _flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, softmax_scale=scale, causal=causal, return_lse=True,
    )[:2]


def _varlen_backward(q, k, v, out, lse, grad_out, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     scale, causal):
    """FlashAttention-4's varlen backward, called as flash_attn_varlen_func's own backward calls it; lse and grad_lse
    in FA4's layout [heads, tokens]. Returns (dq, dk, dv)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    return _flash_attn_bwd(
        q, k, v, out, grad_out, lse, scale, causal, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dlse=grad_lse,
    )[:3]


def _key_copies(k_gathered, v_gathered, layout):
    if layout.key_index is None:
        return (t.split([layout.num_keys, len(t) - layout.num_keys])[0] for t in (k_gathered, v_gathered))
    return (t.index_select(0, layout.key_index) for t in (k_gathered, v_gathered))


def forward(q, k_gathered, v_gathered, key, scale):
    lay, num_pad = layout(key), key.plan.num_local_pad
    k, v = _key_copies(k_gathered, v_gathered, lay)
    out, lse = _varlen_forward(q[: len(q) - num_pad], k, v, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.max_seqlen_q,
                               lay.max_seqlen_k, scale, key.causal)
    return with_pad_tail([out], [lse.T], num_pad)


def backward(q, k_gathered, v_gathered, out, lse, grad_out, grad_lse, key, scale):
    """FA4's backward, then the gradients of the key copies added up per gathered token, zeros for the pad tail."""
    lay, num_valid = layout(key), len(q) - key.plan.num_local_pad
    k, v = _key_copies(k_gathered, v_gathered, lay)
    grad_q, grad_k, grad_v = _varlen_backward(
        q[:num_valid], k, v, out[:num_valid], lse[:num_valid].T.contiguous(), grad_out[:num_valid],
        None if grad_lse is None else grad_lse[:num_valid].T.contiguous(), lay.cu_seqlens_q, lay.cu_seqlens_k,
        lay.max_seqlen_q, lay.max_seqlen_k, scale, key.causal,
    )
    grad_q = torch.cat([grad_q, grad_q.new_zeros((len(q) - num_valid, *grad_q.shape[1:]))])
    if lay.key_index is None:
        grad_k, grad_v = (torch.cat([g, g.new_zeros((len(t) - len(g), *g.shape[1:]))])
                          for g, t in ((grad_k, k_gathered), (grad_v, v_gathered)))
    else:
        grad_k, grad_v = (torch.zeros_like(t).index_add_(0, lay.key_index, g)
                          for g, t in ((grad_k, k_gathered), (grad_v, v_gathered)))
    return grad_q, grad_k, grad_v
