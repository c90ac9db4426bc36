"""magi_portable/kernels: each kernel on one rank's share, against plain float64 attention, for every rank of CP 1,
2 and 4 (keys built from their plans, in one process). The torch kernel runs as it is; FlashAttention-4's and SDPA's
calls, CUDA-only, through CPU stand-ins with their semantics (bench/check_attention_op.py checks the real ones on a
GPU): so these test the layouts around them, the pad tail, and the backward from a kernel's own out and lse."""

import math

import pytest
import torch
from einops import rearrange

from magi_portable import DistAttnRuntimeKey, compute_pad_size
from magi_portable.kernels import fa4, matmul, sdpa
from magi_portable.planning import build_plan

HEADS_Q, HEADS_KV, HEAD_DIM = 4, 2, 8
CASES = [([0, 157], True), ([0, 40, 41, 120, 203], True), ([0, 40, 41, 120, 203], False)]


def reference_attention(q, k, v, cu_seqlens, causal, scale):
    """Full masked softmax attention over the global tokens, GQA heads expanded: out and lse [tokens, heads]."""
    total = q.shape[0]
    sample = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), torch.diff(torch.tensor(cu_seqlens)))
    allowed = sample[:, None] == sample[None, :]
    if causal:
        allowed &= torch.ones(total, total, dtype=torch.bool).tril()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v), lse.T


def rank_keys(cu_seqlens, causal, chunk_size, cp_size):
    """The key of every rank of a CP group, for the kernels (which need no process group)."""
    total = cu_seqlens[-1]
    pad = compute_pad_size(total, cp_size, chunk_size)
    return [DistAttnRuntimeKey(tuple(cu_seqlens), causal, HEADS_Q, HEADS_KV, HEAD_DIM, pad, chunk_size, None,
                               build_plan(cu_seqlens, causal, chunk_size, total + pad, cp_size, rank, "cpu"))
            for rank in range(cp_size)]


def random_inputs(total, gen):
    """q, k, v, and the gradients of out and lse, float64, global."""
    return [torch.randn(total, *shape, generator=gen, dtype=torch.float64)
            for shape in ((HEADS_Q, HEAD_DIM), (HEADS_KV, HEAD_DIM), (HEADS_KV, HEAD_DIM), (HEADS_Q, HEAD_DIM),
                          (HEADS_Q,))]


def padded(t, pad):
    return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])


def check_operator_kernel(kernel, cu_seqlens, causal, cp_size, gen):
    """forward and backward on each rank's share: out and lse of its queries, and the gradients, which the CP group
    sums (dK/dV as calc_attn's reduce-scatter does), against the reference."""
    scale = HEAD_DIM**-0.5
    q, k, v, grad_out, grad_lse = random_inputs(cu_seqlens[-1], gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*leaves, cu_seqlens, causal, scale)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse * grad_lse).sum(), leaves)
    keys = rank_keys(cu_seqlens, causal, 8, cp_size)
    pad = keys[0].pad_size
    grads = [padded(torch.zeros_like(t), pad) for t in (q, k, v)]
    for key in keys:
        plan = key.plan
        local, gathered = plan.local_token_index, plan.dispatch_order
        q_local, k_gathered, v_gathered = padded(q, pad)[local], padded(k, pad)[gathered], padded(v, pad)[gathered]
        out, lse = kernel.forward(q_local, k_gathered, v_gathered, key, scale)
        valid = local < cu_seqlens[-1]
        assert torch.allclose(out[valid], ref_out[local[valid]], atol=1e-12)
        assert torch.allclose(lse[valid], ref_lse[local[valid]], atol=1e-12)
        assert out[~valid].eq(0).all() and lse[~valid].eq(-math.inf).all()
        dq, dk, dv = kernel.backward(q_local, k_gathered, v_gathered, out, lse, padded(grad_out, pad)[local],
                                     padded(grad_lse, pad)[local], key, scale)
        grads[0][local] += dq
        grads[1].index_add_(0, gathered, dk)
        grads[2].index_add_(0, gathered, dv)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert (got[: cu_seqlens[-1]] - want).abs().max() < 1e-10, f"d{name}, CP {cp_size}, {cu_seqlens}, {causal}"


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_the_torch_kernel(cp_size):
    gen = torch.Generator().manual_seed(0)
    for cu_seqlens, causal in CASES:
        check_operator_kernel(matmul, cu_seqlens, causal, cp_size, gen)


FA4_CALLS = []


def fa4_ranges(cu_seqlens_q, cu_seqlens_k):
    return [(slice(a, b), slice(c, d)) for a, b, c, d in
            zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:])]


def fa4_forward_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    """FlashAttention-4's varlen forward: batch i is queries [cu_q[i], cu_q[i+1]) against keys [cu_k[i], cu_k[i+1]),
    causal bottom-right aligned; lse [heads, tokens]."""
    FA4_CALLS.append(("forward", len(cu_seqlens_q) - 1))
    assert q.shape[0] == cu_seqlens_q[-1] and k.shape[0] == v.shape[0] == cu_seqlens_k[-1]
    assert max_seqlen_q == max(torch.diff(cu_seqlens_q)) and max_seqlen_k == max(torch.diff(cu_seqlens_k))
    blocks = [matmul.attend_block(q[queries], k[keys], v[keys], scale, causal)
              for queries, keys in fa4_ranges(cu_seqlens_q, cu_seqlens_k)]
    return torch.cat([out for out, _ in blocks]), torch.cat([lse for _, lse in blocks]).T


def fa4_backward_stand_in(q, k, v, out, lse, grad_out, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, scale, causal):
    """FlashAttention-4's varlen backward, by autograd through the same blocks; lse and grad_lse (or None)
    [heads, tokens]."""
    FA4_CALLS.append(("backward", len(cu_seqlens_q) - 1))
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        outs, lses = fa4_forward_stand_in(*leaves, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                          causal)
        FA4_CALLS.pop()
        loss = (outs * grad_out).sum() + (0 if grad_lse is None else (lses * grad_lse).sum())
        return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_the_fa4_kernel_layout(monkeypatch, cp_size):
    """One FA4 call forward and one backward for all of a rank's query ranges, each with its own copy of its keys;
    the pad tail; the gradients of keys that several ranges share."""
    monkeypatch.setattr(fa4, "_varlen_forward", fa4_forward_stand_in)
    monkeypatch.setattr(fa4, "_varlen_backward", fa4_backward_stand_in)
    gen = torch.Generator().manual_seed(1)
    for cu_seqlens, causal in CASES:
        FA4_CALLS.clear()
        check_operator_kernel(fa4, cu_seqlens, causal, cp_size, gen)
        ranges = [len(key.plan.query_ranges) for key in rank_keys(cu_seqlens, causal, 8, cp_size)]
        assert FA4_CALLS == [call for n in ranges for call in (("forward", n), ("backward", n))]


def test_the_sdpa_kernel_runs_once_per_sample(monkeypatch):
    """At CP 1 the sdpa kernel runs SDPA's kernel once per sample and pads the tail. Its lse has no gradient: one
    through it stops with an error that says so."""
    calls = []

    def sdpa_stand_in(q, k, v, scale, causal):
        calls.append(q.shape[2])
        out, lse = matmul.attend_block(*(rearrange(t, "1 h l d -> l h d") for t in (q, k, v)), scale, causal)
        return rearrange(out, "l h d -> 1 h l d"), rearrange(lse, "l h -> 1 h l")

    monkeypatch.setattr(sdpa, "_attend_sample", sdpa_stand_in)
    gen = torch.Generator().manual_seed(2)
    for cu_seqlens, causal, expected_calls in [([0, 700, 700, 1800], True, [700, 1100]), ([0, 1100], False, [1100])]:
        calls.clear()
        (key,) = rank_keys(cu_seqlens, causal, 512, 1)
        total, pad = cu_seqlens[-1], key.pad_size
        q, k, v, grad_out, grad_lse = random_inputs(total, gen)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out, lse = sdpa.attend(*(padded(t, pad) for t in leaves), key, HEAD_DIM**-0.5)
        assert calls == expected_calls
        assert out[total:].eq(0).all() and lse[total:].eq(-math.inf).all()
        ref_out, ref_lse = reference_attention(*leaves, cu_seqlens, causal, HEAD_DIM**-0.5)
        grads = torch.autograd.grad((out[:total] * grad_out).sum(), leaves, retain_graph=True)
        ref_grads = torch.autograd.grad((ref_out * grad_out).sum(), leaves)
        for got, want in [(out[:total], ref_out), (lse[:total], ref_lse), *zip(grads, ref_grads)]:
            assert (got - want).abs().max() < 1e-10
        with pytest.raises(RuntimeError, match="lse has no gradient with the sdpa kernel"):
            (lse[:total] * grad_lse).sum().backward()


def test_cpu_tensors_take_only_the_torch_kernel():
    (key,) = rank_keys([0, 64], True, 16, 1)
    q, k = torch.randn(64, HEADS_Q, HEAD_DIM), torch.randn(64, HEADS_KV, HEAD_DIM)
    assert "Hopper and Blackwell GPUs" in fa4.unavailable(q, k, k, key)
    assert sdpa.unavailable(q, k, k, key) == "it needs a CUDA device"
    assert matmul.unavailable(q, k, k, key) is None
