"""The flex kernel: compiled FlexAttention of this rank's queries against all gathered keys (left in dispatch order),
with a block mask per key (CUDA: FlexAttention has no backward on CPU). Gradient checkpointing cannot keep its
outputs (long_context.py): the compiled kernel is no operator that torch's dispatcher sees.
"""

import functools
import weakref

import torch
from einops import rearrange
from torch.nn.attention import flex_attention as flex


def unavailable(q, k, v, key):
    return None if q.is_cuda else "it needs a CUDA device"


@functools.cache
def _compiled(function):
    """Compiled once per process, for all keys."""
    return torch.compile(function)


_block_masks: "weakref.WeakKeyDictionary[object, flex.BlockMask]" = weakref.WeakKeyDictionary()  # by plan


def _block_mask(key, device):
    """Masked per token; built once per key, since building it evaluates the mask over every block."""
    plan = key.plan
    if plan not in _block_masks:
        q_pos = plan.local_token_index.to(device)
        k_pos = plan.dispatch_order.to(device)
        # Sample ids; pad tokens get -1 as queries and -2 as keys, so they see nothing and nothing sees them.
        lengths = torch.diff(torch.tensor(key.cu_seqlens, device=device))
        sample_id = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        sample_id = torch.cat([sample_id, sample_id.new_full((key.pad_size,), -1)])
        q_sample = sample_id[q_pos]
        k_sample = torch.where(sample_id[k_pos] < 0, -2, sample_id[k_pos])
        causal = key.causal

        def mask_mod(batch, head, q_idx, kv_idx):
            same_sample = q_sample[q_idx] == k_sample[kv_idx]
            return same_sample & (k_pos[kv_idx] <= q_pos[q_idx]) if causal else same_sample

        _block_masks[plan] = _compiled(flex.create_block_mask)(
            mask_mod, B=None, H=None, Q_LEN=len(q_pos), KV_LEN=len(k_pos), device=device
        )
    return _block_masks[plan]


def attend(q, k_gathered, v_gathered, key, scale):
    q, k, v = (rearrange(t, "l h d -> 1 h l d") for t in (q, k_gathered, v_gathered))
    kwargs = dict(block_mask=_block_mask(key, q.device), scale=scale, enable_gqa=True)
    if hasattr(flex, "AuxRequest"):  # torch >= 2.9 reports lse through return_aux
        out, aux = _compiled(flex.flex_attention)(q, k, v, return_aux=flex.AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    else:
        out, lse = _compiled(flex.flex_attention)(q, k, v, return_lse=True, **kwargs)
    return rearrange(out, "1 h l d -> l h d"), rearrange(lse, "1 h l -> l h")
