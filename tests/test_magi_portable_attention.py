"""magi_portable/attention.py: calc_attn on real gloo process groups at CP 1, 2 and 4 (the planner's tests take CP 8
too), dispatched inputs to undispatched outputs and back to the gradients, against plain float64 attention; and the
choice of its kernel."""

import math

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks
from test_magi_portable_kernels import HEAD_DIM, HEADS_KV, HEADS_Q, reference_attention

import magi_portable as magi
from magi_portable.attention import pick_kernel


def random_cu_seqlens(gen, total, num_samples):
    cuts = torch.randperm(total - 1, generator=gen)[: num_samples - 1] + 1
    return [0, *sorted(cuts.tolist()), total]


def run_case(group, cu_seqlens, causal, chunk_size, dtype, gen, softmax_scale=None):
    cp_size, total = group.size(), cu_seqlens[-1]
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    pad_size = magi.compute_pad_size(total, cp_size, chunk_size)
    key = magi.magi_attn_varlen_key(cu, cu, HEADS_Q, HEADS_KV, HEAD_DIM, pad_size, group, causal=causal,
                                    chunk_size=chunk_size)
    # Same global tensors on every rank (same generator state everywhere).
    q_ref, k_ref, v_ref = (torch.randn(total, heads, HEAD_DIM, generator=gen, dtype=torch.float64)
                           for heads in (HEADS_Q, HEADS_KV, HEADS_KV))
    grad_out = torch.randn(total, HEADS_Q, HEAD_DIM, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(total, HEADS_Q, generator=gen, dtype=torch.float64)
    scale = HEAD_DIM**-0.5 if softmax_scale is None else softmax_scale

    q_ref, k_ref, v_ref = (t.requires_grad_() for t in (q_ref, k_ref, v_ref))
    out_ref, lse_ref = reference_attention(q_ref, k_ref, v_ref, cu_seqlens, causal, scale)
    ((out_ref * grad_out).sum() + (lse_ref * grad_lse).sum()).backward()

    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q_ref, k_ref, v_ref))
    local_out, meta = magi.calc_attn(
        magi.dispatch(q, key), magi.dispatch(k, key), magi.dispatch(v, key), key, softmax_scale=softmax_scale
    )
    assert local_out.dtype == dtype and local_out.shape == (key.num_local_tokens, HEADS_Q, HEAD_DIM)
    is_pad = magi.dispatch(torch.arange(total), key, pad_value=-1) < 0
    assert local_out[is_pad].eq(0).all() and meta.lse[is_pad].eq(-math.inf).all()
    out, lse = magi.undispatch(local_out, key), magi.undispatch(meta.lse, key)
    ((out * grad_out.to(dtype)).sum() + (lse * grad_lse.to(lse.dtype)).sum()).backward()

    grads = [(t.grad, t_ref.grad) for t, t_ref in ((q, q_ref), (k, k_ref), (v, v_ref))]
    for name, (got, want) in zip(["out", "lse", "dq", "dk", "dv"], [(out, out_ref), (lse, lse_ref), *grads]):
        got, want = got.detach().double(), want.detach()
        if dtype == torch.float64:
            err = (got - want).abs().max().item()
            assert err < 1e-10, f"{name}: max abs err {err} ({cu_seqlens=}, {causal=}, {cp_size=})"
        else:
            err = ((got - want).norm() / want.norm()).item()
            assert err < 1e-5, f"{name}: relative err {err} ({cu_seqlens=}, {causal=}, {cp_size=})"
    return key


def check_calc_attn(group):
    gen = torch.Generator().manual_seed(1234)  # identical on all ranks
    chunk_size = 8 if group.size() >= 4 else 16
    for dtype in (torch.float64, torch.float32):
        for causal in (True, False):
            run_case(group, [0, 157], causal, chunk_size, dtype, gen)
            run_case(group, random_cu_seqlens(gen, 203, 5), causal, chunk_size, dtype, gen)
    key = run_case(group, random_cu_seqlens(gen, 90, 3), True, 8, torch.float64, gen, softmax_scale=0.3)
    if group.size() > 1:
        assert len(key.plan.rank_chunks[0]) >= 2


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_calc_attn_matches_the_reference(cp_size, tmp_path):
    run_on_ranks(check_calc_attn, cp_size, tmp_path)


def test_kernel_choice(monkeypatch):
    """On CPU the default kernel is torch, and a forced kernel that cannot run here says why."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cu = torch.tensor([0, 64])
        key = magi.magi_attn_varlen_key(cu, cu, HEADS_Q, HEADS_KV, HEAD_DIM, 0, dist.group.WORLD, causal=True,
                                        chunk_size=16)
        q = torch.randn(64, HEADS_Q, HEAD_DIM, dtype=torch.bfloat16)
        kv = torch.randn(64, HEADS_KV, HEAD_DIM, dtype=torch.bfloat16)
        monkeypatch.delenv(magi.KERNEL_ENV, raising=False)
        assert pick_kernel(q, kv, kv, key) == "torch"
        for choice, message in [("fa4", "the fa4 kernel cannot run: it runs on Hopper and Blackwell GPUs"),
                                ("flex", "the flex kernel cannot run: it needs a CUDA device"),
                                ("sdpa", "the sdpa kernel cannot run: it needs a CUDA device"),
                                ("cudnn", "use one of auto, fa4, sdpa, flex, torch")]:
            monkeypatch.setenv(magi.KERNEL_ENV, choice)
            with pytest.raises((RuntimeError, ValueError), match=message):
                magi.calc_attn(q, kv, kv, key)
        monkeypatch.setenv(magi.KERNEL_ENV, "torch")
        assert magi.calc_attn(q, kv, kv, key)[0].shape == q.shape
    finally:
        dist.destroy_process_group()
