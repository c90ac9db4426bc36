"""The sdpa kernel, at CP 1: every sample is whole on its rank, so each one is a plain causal (or full) attention, run
by the kernel that torch's scaled_dot_product_attention itself picks for these tensors (cuDNN on Hopper), called
directly because SDPA does not return the lse. Its operators are SDPA's own, with their own backward (from their
outputs: gradient checkpointing can keep those, see long_context.py). Their lse has no gradient: a gradient through
calc_attn's lse stops with an error here.
"""

import torch
from einops import rearrange
from torch.nn.attention import SDPBackend

from . import with_pad_tail

_CUDNN, _FLASH = SDPBackend.CUDNN_ATTENTION.value, SDPBackend.FLASH_ATTENTION.value  # return the lse, have a backward


def _picked_backend(q, k, v, causal, scale) -> int:
    """The kernel SDPA would run on these tensors ([1, heads, tokens, d]), as an SDPBackend value. torch says which
    kernels can run (torch.backends.cuda.can_use_*), but only this private function says which one SDPA prefers."""
    return torch._fused_sdp_choice(q, k, v, None, 0.0, causal, scale=scale, enable_gqa=True)


def unavailable(q, k, v, key):
    if not q.is_cuda:
        return "it needs a CUDA device"
    if key.cp_size > 1:
        return f"it runs whole samples, at CP 1 only, and this key has CP {key.cp_size}"
    sample = (rearrange(t, "l h d -> 1 h l d") for t in (q, k, v))
    if _picked_backend(*sample, key.causal, key.head_dim**-0.5) not in (_CUDNN, _FLASH):
        return "SDPA picks a kernel here that does not return the lse (neither cuDNN nor FlashAttention-2)"
    return None


def _attend_sample(q, k, v, scale, causal):
    """All of q against all of k/v ([1, heads, tokens, d]), causal or full, by SDPA's kernel: out and lse [1, h, l]."""
    if _picked_backend(q, k, v, causal, scale) == _CUDNN:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])  # cuDNN's lse is [b, h, tokens, 1]


class _LseHasNoGradient(torch.autograd.Function):
    """lse as it is, whose backward stops with an error: SDPA's kernels give their lse no gradient."""

    @staticmethod
    def forward(ctx, lse, q):
        return lse.clone()

    @staticmethod
    def backward(ctx, grad_lse):
        raise RuntimeError(
            "calc_attn's lse has no gradient with the sdpa kernel (SDPA's kernels give none): set "
            "MAGI_ATTENTION_KERNEL_BACKEND to fa4 or flex."
        )


def attend(q, k, v, key, scale):
    """Each sample by SDPA's kernel; the pad tail gets zeros and an lse of -inf. q/k/v are [tokens, heads, d]."""
    # split, not slicing: the backward of a slice would build a zero gradient the size of q for every sample.
    lengths = [r.length for r in key.plan.query_ranges] + [key.plan.num_local_pad]
    q_parts, k_parts, v_parts = (rearrange(t, "l h d -> 1 h l d").split(lengths, dim=2) for t in (q, k, v))
    outs, lses = [], []
    for i in range(len(lengths) - 1):
        out, lse = _attend_sample(q_parts[i], k_parts[i], v_parts[i], scale, key.causal)
        outs.append(rearrange(out, "1 h l d -> l h d"))
        lses.append(rearrange(lse, "1 h l -> l h"))
    out, lse = with_pad_tail(outs, lses, key.plan.num_local_pad)
    return out, _LseHasNoGradient.apply(lse, q) if q.requires_grad else lse
