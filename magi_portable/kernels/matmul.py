"""The torch kernel: exact attention by matmuls, any device (the CPU's kernel), block by block (_blocks), with a
backward from the forward's out and lse as FlashAttention's."""

import math

import torch
from einops import rearrange

from . import with_pad_tail


def unavailable(q, k, v, key):
    return None


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


def attend_block(q, k, v, scale, causal):
    """Exact attention of q [lq, hq, d] to k/v [lk, hkv, d]; causal is bottom-right aligned. Returns out like q and
    lse [lq, hq]."""
    num_q = q.shape[0]
    scores = _grouped_scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.bmm(torch.exp(scores - lse.unsqueeze(-1)), rearrange(v, "lk hkv d -> hkv lk d"))
    out = rearrange(out, "hkv (g lq) d -> lq (hkv g) d", lq=num_q)
    return out, rearrange(lse, "hkv (g lq) -> lq (hkv g)", lq=num_q)


def attend_block_backward(q, k, v, out, lse, grad_out, grad_lse, scale, causal):
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


def _blocks(key):
    """Each query range in blocks of at most chunk_size queries (so no block scores more than chunk x sample pairs),
    against the keys of its sample up to the block's end (if causal). Yields slices of the local queries and of the
    global keys."""
    for r in key.plan.query_ranges:
        for offset in range(0, r.length, key.chunk_size):
            num_q = min(key.chunk_size, r.length - offset)
            q_start = r.local_start + offset
            yield slice(q_start, q_start + num_q), slice(r.sample_start, r.key_end(key.causal, offset + num_q))


def _in_global_order(k_gathered, v_gathered, plan, dtype):
    """The gathered keys and values in the sequence's order, in dtype."""
    to_global = plan.global_to_dispatch.to(k_gathered.device)
    return (t.index_select(0, to_global).to(dtype) for t in (k_gathered, v_gathered))


def forward(q, k_gathered, v_gathered, key, scale):
    """In float32 at least, autocast off: the backward recomputes the probabilities from lse, and they must be the
    forward's."""
    plan = key.plan
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    k_global, v_global = _in_global_order(k_gathered, v_gathered, plan, compute_dtype)
    with torch.autocast(q.device.type, enabled=False):
        q_compute = q.to(compute_dtype)
        outs, lses = [q_compute.new_zeros((0, *q.shape[1:]))], [q_compute.new_zeros((0, q.shape[1]))]
        for queries, keys in _blocks(key):
            out, lse = attend_block(q_compute[queries], k_global[keys], v_global[keys], scale, key.causal)
            outs.append(out)
            lses.append(lse)
    out, lse = with_pad_tail(outs, lses, plan.num_local_pad)
    return out.to(q.dtype), lse


def backward(q, k_gathered, v_gathered, out, lse, grad_out, grad_lse, key, scale):
    """forward's gradients from its out and lse, block by block."""
    plan = key.plan
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    k_global, v_global = _in_global_order(k_gathered, v_gathered, plan, compute_dtype)
    with torch.autocast(q.device.type, enabled=False):
        q_c, out_c, grad_out_c = (t.to(compute_dtype) for t in (q, out, grad_out))
        grad_q, grad_k_global, grad_v_global = (torch.zeros_like(t) for t in (q_c, k_global, v_global))
        for queries, keys in _blocks(key):
            block_grad_lse = None if grad_lse is None else grad_lse[queries]
            block_q, block_k, block_v = attend_block_backward(
                q_c[queries], k_global[keys], v_global[keys], out_c[queries], lse[queries], grad_out_c[queries],
                block_grad_lse, scale, key.causal,
            )
            grad_q[queries] = block_q
            grad_k_global[keys] += block_k
            grad_v_global[keys] += block_v
    # The gathered K/V were put in global order (_in_global_order), a permutation: its inverse is the dispatch order.
    to_gathered = plan.dispatch_order.to(q.device)
    return (grad_q.to(q.dtype), grad_k_global.index_select(0, to_gathered).to(k_gathered.dtype),
            grad_v_global.index_select(0, to_gathered).to(v_gathered.dtype))
