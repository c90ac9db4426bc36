"""calc_attn's kernels: the attention of this rank's queries q [local_tokens, heads_q, d] against the gathered keys and
values k, v [cp_size x local_tokens, heads_kv, d] (in dispatch order) that their mask allows. Each returns out like q
and lse [local_tokens, heads_q] (float32 at least), with zeros and -inf on the pad tail.

Every kernel module has `unavailable(q, k, v, key)`: why it cannot run on these tensors, or None. Then either
- `forward(q, k, v, key, scale)` and `backward(q, k, v, out, lse, grad_out, grad_lse, key, scale)` -> (dq, dk, dv),
  a backward from the forward's own out and lse (grad_lse may be None): calc_attn runs them as one operator
  (fa4, torch);
- or `attend(q, k, v, key, scale)`, differentiable by autograd (sdpa, flex).
A kernel keeps what it prepares once per key (the fa4 layout, the flex block mask) itself.
"""

import math

import torch


def with_pad_tail(outs, lses, num_pad):
    """Concatenate the outputs and lse of the query ranges (or blocks), then the pad tokens' zeros and -inf."""
    if num_pad:
        outs = [*outs, outs[0].new_zeros((num_pad, *outs[0].shape[1:]))]
        lses = [*lses, lses[0].new_full((num_pad, lses[0].shape[1]), -math.inf)]
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
