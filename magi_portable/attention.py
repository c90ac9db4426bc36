"""calc_attn: all-gather K and V over the CP group (the backward reduce-scatters dK/dV), then exact masked attention of
each local query range against its sample's keys (up to the range's end if causal), by one of the kernels
(kernels/), chosen in pick_kernel.

The fa4 and torch kernels run as one operator, magi_portable::attention, whose backward starts from the operator's
own out and lse: gradient checkpointing can keep those and skip the kernel when it recomputes a layer
(long_context.py's keep_attention_outputs). The sdpa kernel's operators are SDPA's own, with such a backward too.
"""

import functools
import logging
import os
import weakref
from dataclasses import dataclass

import torch

from .collectives import GatherKV
from .key import DistAttnRuntimeKey
from .kernels import fa4, flex, matmul, sdpa
from .planning import DEFAULT_MAX_CHUNK_SIZE

KERNEL_ENV = "MAGI_ATTENTION_KERNEL_BACKEND"
KERNELS = {"fa4": fa4, "sdpa": sdpa, "flex": flex, "torch": matmul}  # the fastest first
OPERATOR_KERNELS = ("fa4", "torch")  # those with a backward from their own out and lse
logger = logging.getLogger(__name__)


@dataclass
class AttnForwardMeta:
    lse: torch.Tensor  # [local_tokens, num_heads_q] float32 (float64 for float64 q); -inf on pad tokens


def pick_kernel(q, k, v, key) -> str:
    """The kernel MAGI_ATTENTION_KERNEL_BACKEND names, checked; by default the fastest that can run here:
    FlashAttention-4, else SDPA's kernel per sample (CP 1, where samples average at least DEFAULT_MAX_CHUNK_SIZE
    tokens: for shorter ones a launch per sample likely costs more, not measured), else FlexAttention (CUDA), else
    torch."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", *KERNELS):
        raise ValueError(f"{KERNEL_ENV}={choice!r}: use one of auto, {', '.join(KERNELS)}.")
    if choice != "auto":
        reason = KERNELS[choice].unavailable(q, k, v, key)
        if reason is not None:
            raise RuntimeError(f"{KERNEL_ENV}={choice}, but the {choice} kernel cannot run: {reason}.")
        return choice
    long_samples = key.total_seqlen >= len(key.plan.query_ranges) * DEFAULT_MAX_CHUNK_SIZE
    return next(name for name, kernel in KERNELS.items()
                if (name != "sdpa" or long_samples) and kernel.unavailable(q, k, v, key) is None)


# An operator's arguments cannot be a key: key_id names one, while it lives.
_keys_by_id: "weakref.WeakValueDictionary[int, DistAttnRuntimeKey]" = weakref.WeakValueDictionary()


@torch.library.custom_op("magi_portable::attention", mutates_args=())
def attention_operator(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_id: int, kernel: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's queries against the gathered K/V by an operator kernel, as one operator that torch's dispatcher
    sees, with a backward that needs only its inputs and outputs."""
    return KERNELS[kernel].forward(q, k, v, _keys_by_id[key_id], scale)


def _setup_context(ctx, inputs, output):
    q, k, v, key_id, kernel, scale = inputs
    ctx.key, ctx.kernel, ctx.scale = _keys_by_id[key_id], kernel, scale
    ctx.save_for_backward(q, k, v, *output)
    ctx.set_materialize_grads(False)  # no gradient of lse (the usual case) comes as None, not as zeros


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grads = KERNELS[ctx.kernel].backward(q, k, v, out, lse, grad_out, grad_lse, ctx.key, ctx.scale)
    return (*grads, None, None, None)


attention_operator.register_autograd(_backward, setup_context=_setup_context)


@functools.cache
def _log_kernel(kernel, device_type, dtype, cp_size):
    logger.info(f"calc_attn runs the {kernel} kernel ({device_type}, {dtype}, CP {cp_size})")


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
    kernel = pick_kernel(q, k, v, key)
    _log_kernel(kernel, q.device.type, q.dtype, key.cp_size)

    if key.cp_size > 1:
        # One all-gather for K and V together; its backward reduce-scatters dK/dV to their owners.
        kv = GatherKV.apply(torch.cat([k, v], dim=1), key.cp_group)
        k, v = kv.split(key.num_heads_kv, dim=1)
    if kernel in OPERATOR_KERNELS:
        _keys_by_id[id(key)] = key
        out, lse = attention_operator(q, k, v, id(key), kernel, scale)
    else:
        out, lse = KERNELS[kernel].attend(q, k, v, key, scale)
    return out.to(q.dtype), AttnForwardMeta(lse=lse.to(torch.promote_types(q.dtype, torch.float32)))
