"""Tests of magi_portable: real multi-process gloo runs against a plain float64 reference."""

import math
import os
import queue
import random
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from einops import rearrange

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import magi_portable as magi  # noqa: E402

HEADS_Q, HEADS_KV, HEAD_DIM = 4, 2, 16
WORKER_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# Pure helpers and planning (single process)
# ---------------------------------------------------------------------------------------------


def test_small_helpers():
    assert magi.compute_pad_size(100, 4, 8) == 28
    assert magi.compute_pad_size(128, 4, 8) == 0
    assert magi.squash_batch_dim(torch.zeros(3, 5, 7)).shape == (15, 7)
    cu_q, cu_k = magi.infer_varlen_mask_from_batch(3, 5, device="cpu")
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == [0, 5, 10, 15] and cu_k.tolist() == cu_q.tolist()
    assert magi.default_chunk_size(8192, 8) == 128 and magi.default_chunk_size(10**6, 8) == 512


def _check_assignment(rank_chunks, rank_areas, cu_seqlens, causal, chunk_size, padded_total):
    num_chunks = padded_total // chunk_size
    assert sorted(c for chunks in rank_chunks for c in chunks) == list(range(num_chunks))
    assert len({len(chunks) for chunks in rank_chunks}) == 1
    areas = magi.token_attn_areas(cu_seqlens, causal, padded_total).view(num_chunks, chunk_size).sum(1)
    assert [int(areas[list(chunks)].sum()) for chunks in rank_chunks] == list(rank_areas)
    assert sum(rank_areas) == int(magi.token_attn_areas(cu_seqlens, causal, padded_total).sum())


def test_balance_causal_8192_cp8():
    rank_chunks, rank_areas = magi.assign_chunks([0, 8192], True, 512, 8, 8192)
    _check_assignment(rank_chunks, rank_areas, [0, 8192], True, 512, 8192)
    assert magi.area_imbalance(rank_areas) <= 1.05
    assert any(chunks[1] != chunks[0] + 1 for chunks in rank_chunks)  # non-contiguous shards


@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_one_causal_sample_is_cut_into_a_head_and_a_tail_per_rank(cp_size):
    # FlashAttention-4 attends each contiguous query range of a rank in one call: the plan keeps them few.
    chunk_size = magi.default_chunk_size(131072, cp_size)
    rank_chunks, rank_areas = magi.assign_chunks([0, 131072], True, chunk_size, cp_size, 131072)
    _check_assignment(rank_chunks, rank_areas, [0, 131072], True, chunk_size, 131072)
    assert magi.area_imbalance(rank_areas) == 1.0
    for chunks in rank_chunks:
        ranges, num_pad = magi._query_ranges(chunks, chunk_size, [0, 131072])
        assert 1 <= len(ranges) <= 2 and num_pad == 0
        assert sum(r.length for r in ranges) == 131072 // cp_size


@pytest.mark.parametrize("causal", [True, False])
def test_balance_random_varlen(causal):
    # >= 8 chunks per rank, as the default chunk size guarantees. With only 4 the greedy can reach
    # about 1.15 on full masks made of a few long samples (equal-area chunks pack unevenly).
    rng = random.Random(0)
    for _ in range(30):
        cp_size, chunk_size = rng.choice([2, 4, 8]), rng.choice([32, 64, 128])
        chunks_per_rank = rng.randint(8, 16)
        target = cp_size * chunk_size * chunks_per_rank - rng.randint(0, chunk_size - 1)
        cu_seqlens = [0]
        while cu_seqlens[-1] < target:
            cu_seqlens.append(min(target, cu_seqlens[-1] + rng.randint(1, target // 2)))
        padded_total = target + magi.compute_pad_size(target, cp_size, chunk_size)
        rank_chunks, rank_areas = magi.assign_chunks(cu_seqlens, causal, chunk_size, cp_size, padded_total)
        _check_assignment(rank_chunks, rank_areas, cu_seqlens, causal, chunk_size, padded_total)
        assert magi.area_imbalance(rank_areas) <= 1.10, (cu_seqlens, cp_size, chunk_size)


# ---------------------------------------------------------------------------------------------
# Multi-process runs: one process group per CP size, all cases inside it
# ---------------------------------------------------------------------------------------------


def reference_attention(q, k, v, cu_seqlens, causal, scale):
    """Full masked softmax attention over the global tokens, GQA heads expanded."""
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
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out, lse.T


def random_cu_seqlens(gen, total, num_samples):
    cuts = torch.randperm(total - 1, generator=gen)[: num_samples - 1] + 1
    return [0, *sorted(cuts.tolist()), total]


def run_case(group, cu_seqlens, causal, chunk_size, dtype, gen, softmax_scale=None):
    cp_size, total = group.size(), cu_seqlens[-1]
    pad_size = magi.compute_pad_size(total, cp_size, chunk_size)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    key = magi.magi_attn_varlen_key(
        cu, cu, HEADS_Q, HEADS_KV, HEAD_DIM, pad_size, group, causal=causal, chunk_size=chunk_size
    )
    assert key.padded_total_seqlen == total + pad_size and key.total_seqlen == total
    assert key.num_local_tokens == (total + pad_size) // cp_size
    assert key.cp_size == cp_size and key.cp_rank == torch.distributed.get_rank(group)

    # Same global tensors on every rank (same generator state everywhere).
    q_ref, k_ref, v_ref = (
        torch.randn(total, heads, HEAD_DIM, generator=gen, dtype=torch.float64)
        for heads in (HEADS_Q, HEADS_KV, HEADS_KV)
    )
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
    num_pad = int((magi.dispatch(torch.arange(total), key, pad_value=-1) < 0).sum())
    if num_pad:
        assert local_out[-num_pad:].eq(0).all() and meta.lse[-num_pad:].eq(-math.inf).all()
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


def check_key_and_layout(group, gen):
    cp_size = group.size()
    cu_seqlens = random_cu_seqlens(gen, 101, 4)
    cu = torch.tensor(cu_seqlens)
    pad_size = magi.compute_pad_size(101, cp_size, 8)
    heads = (HEADS_Q, HEADS_KV, HEAD_DIM)
    key = magi.magi_attn_varlen_key(cu, cu, *heads, pad_size, group, causal=True, chunk_size=8)
    same = magi.magi_attn_varlen_key(cu, cu.clone(), *heads, pad_size, group, True, chunk_size=8)
    assert same is key and hash(same) == hash(key) and magi.get_most_recent_key(group) is key
    default_chunk = magi.default_chunk_size(101, cp_size)
    default_pad = magi.compute_pad_size(101, cp_size, default_chunk)
    default_key = magi.magi_attn_varlen_key(cu, cu, *heads, default_pad, group)
    assert default_key.chunk_size == default_chunk and magi.get_most_recent_key(group) is default_key
    assert magi.get_attn_area_imbalance(key) == key.attn_area_imbalance >= 1.0

    # dispatch then undispatch is the identity (integer and float tensors); positions are global.
    tokens = torch.arange(101)
    local_tokens = magi.dispatch(tokens, key, pad_value=-1)
    assert torch.equal(magi.undispatch(local_tokens, key), tokens)
    x = torch.randn(101, 3, generator=gen)
    assert torch.equal(magi.undispatch(magi.dispatch(x, key), key), x)
    expected_positions = torch.where(local_tokens < 0, 100, local_tokens)
    assert torch.equal(magi.get_position_ids(key), expected_positions)
    assert local_tokens.shape == (key.num_local_tokens,)

    # Errors that name the problem.
    with pytest.raises(ValueError, match="multiple of num_heads_kv"):
        magi.magi_attn_varlen_key(cu, cu, 3, 2, HEAD_DIM, pad_size, group, chunk_size=8)
    with pytest.raises(ValueError, match="compute_pad_size"):
        magi.magi_attn_varlen_key(cu, cu, *heads, pad_size + 1, group, chunk_size=8)
    with pytest.raises(NotImplementedError, match="window_size"):
        magi.magi_attn_varlen_key(cu, cu, *heads, pad_size, group, window_size=(4, 0), chunk_size=8)
    with pytest.raises(NotImplementedError, match="cu_seqlens_q must equal cu_seqlens_k"):
        magi.magi_attn_varlen_key(cu, torch.tensor([0, 101]), *heads, pad_size, group, chunk_size=8)


FA4_CALLS = []


def fa4_ranges(cu_seqlens_q, cu_seqlens_k):
    return zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:])


def fa4_forward_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    """FlashAttention-4's varlen semantics in float64 on the CPU: batch i is queries [cu_q[i], cu_q[i+1]) against
    keys [cu_k[i], cu_k[i+1]), causal bottom-right aligned; lse [heads, tokens]."""
    FA4_CALLS.append(("forward", len(cu_seqlens_q) - 1))
    assert q.shape[0] == cu_seqlens_q[-1] and k.shape[0] == v.shape[0] == cu_seqlens_k[-1]
    assert max_seqlen_q == max(torch.diff(cu_seqlens_q)) and max_seqlen_k == max(torch.diff(cu_seqlens_k))
    outs, lses = [], []
    for q_start, q_end, k_start, k_end in fa4_ranges(cu_seqlens_q, cu_seqlens_k):
        out, lse = magi._attend_block(q[q_start:q_end], k[k_start:k_end], v[k_start:k_end], scale, causal)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses).T


def fa4_backward_stand_in(q, k, v, out, lse, grad_out, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, scale, causal):
    """FlashAttention-4's varlen backward, the same way; lse and grad_lse [heads, tokens]."""
    FA4_CALLS.append(("backward", len(cu_seqlens_q) - 1))
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for q_start, q_end, k_start, k_end in fa4_ranges(cu_seqlens_q, cu_seqlens_k):
        queries, keys = slice(q_start, q_end), slice(k_start, k_end)
        block_grads = magi._attend_block_backward(
            q[queries], k[keys], v[keys], out[queries], lse.T[queries], grad_out[queries],
            None if grad_lse is None else grad_lse.T[queries], scale, causal,
        )
        for grad, block_grad, rows in zip(grads, block_grads, (queries, keys, keys)):
            grad[rows] += block_grad
    return grads


def cp_worker(rank, cp_size, store_path, results):
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=cp_size,
            timeout=timedelta(seconds=60),
        )
        group = torch.distributed.group.WORLD
        gen = torch.Generator().manual_seed(1234)  # identical on all ranks
        check_key_and_layout(group, gen)
        for dtype in (torch.float64, torch.float32):
            for causal in (True, False):
                chunk_size = 8 if cp_size >= 4 else 16
                run_case(group, [0, 157], causal, chunk_size, dtype, gen)
                run_case(group, random_cu_seqlens(gen, 203, 5), causal, chunk_size, dtype, gen)
        key = run_case(group, random_cu_seqlens(gen, 90, 3), True, 8, torch.float64, gen, softmax_scale=0.3)
        if cp_size > 1:
            assert len(key.plan.rank_chunks[0]) >= 2
        # The fa4 kernel's layout (query ranges, a copy of each one's keys, the pad tail, the gradients of keys
        # that several ranges share), with a float64 CPU stand-in for FlashAttention-4's varlen call.
        magi._fa4_varlen_forward, magi._fa4_varlen_backward = fa4_forward_stand_in, fa4_backward_stand_in
        magi._fa4_unavailable = lambda device, dtype: None
        os.environ[magi.KERNEL_ENV] = "fa4"
        for causal in (True, False):
            for cu_seqlens in ([0, 157], random_cu_seqlens(gen, 203, 5)):
                FA4_CALLS.clear()
                key = run_case(group, cu_seqlens, causal, 8, torch.float64, gen)
                # One call forward and one backward, each for all of this rank's query ranges.
                assert FA4_CALLS == [("forward", len(key.plan.query_ranges)), ("backward", len(key.plan.query_ranges))]
        torch.distributed.destroy_process_group()
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))


@pytest.mark.parametrize("cp_size", [1, 2, 4, 8])
def test_distributed_attention_matches_reference(cp_size, tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [
        ctx.Process(target=cp_worker, args=(rank, cp_size, str(tmp_path / "store"), results), daemon=True)
        for rank in range(cp_size)
    ]
    for worker in workers:
        worker.start()
    failures = []
    try:
        for _ in range(cp_size):
            try:
                rank, error = results.get(timeout=WORKER_TIMEOUT_S)
            except queue.Empty:
                failures.append(f"timed out after {WORKER_TIMEOUT_S}s waiting for workers")
                break
            if error is not None:
                failures.append(f"rank {rank}:\n{error}")
                break  # the other ranks may now be stuck in a collective
    finally:
        for worker in workers:
            worker.join(timeout=0 if failures else 30)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    assert not failures, "\n".join(failures)


def test_sdpa_kernel_runs_once_per_sample(monkeypatch):
    """At CP 1 the sdpa kernel runs SDPA's kernel once per sample and pads the tail. That kernel is CUDA-only, so a
    CPU stand-in takes its place (bench/attention.py checks the real one on a GPU): this tests the cutting into
    samples, empty samples, the pad tail and the gradients through them, against the float64 reference."""
    calls = []

    def sdpa_stand_in(q, k, v, scale, causal):
        calls.append(q.shape[2])
        out, lse = magi._attend_block(*(rearrange(t, "1 h l d -> l h d") for t in (q, k, v)), scale, causal)
        return rearrange(out, "l h d -> 1 h l d"), rearrange(lse, "l h -> 1 h l")

    monkeypatch.setattr(magi, "_sdpa_with_lse", sdpa_stand_in)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        cases = [([0, 700, 700, 1800], True, [700, 1100]), ([0, 1100], False, [1100]), ([0, 1024], True, [1024])]
        for cu_seqlens, causal, expected_calls in cases:
            calls.clear()
            total = cu_seqlens[-1]
            chunk_size = magi.default_chunk_size(total, 1)
            cu = torch.tensor(cu_seqlens)
            key = magi.magi_attn_varlen_key(cu, cu, HEADS_Q, HEADS_KV, HEAD_DIM,
                                            magi.compute_pad_size(total, 1, chunk_size),
                                            torch.distributed.group.WORLD, causal=causal, chunk_size=chunk_size)
            q, k, v = (torch.randn(total, heads, HEAD_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
                       for heads in (HEADS_Q, HEADS_KV, HEADS_KV))
            out, lse = magi._sdpa_per_sample(*(magi.dispatch(t, key) for t in (q, k, v)), key, HEAD_DIM**-0.5)
            assert calls == expected_calls
            assert out[total:].eq(0).all() and lse[total:].eq(-math.inf).all()
            ref_out, ref_lse = reference_attention(q, k, v, cu_seqlens, causal, HEAD_DIM**-0.5)
            grad_out, grad_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
            grads = torch.autograd.grad((out[:total] * grad_out).sum() + (lse[:total] * grad_lse).sum(), (q, k, v))
            ref_grads = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse * grad_lse).sum(), (q, k, v))
            for got, want in [(out[:total], ref_out), (lse[:total], ref_lse), *zip(grads, ref_grads)]:
                assert (got - want).abs().max() < 1e-10
    finally:
        torch.distributed.destroy_process_group()


def test_kernel_choice(monkeypatch):
    """On CPU the default kernel is torch, and a forced kernel that cannot run here says why."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        cu = torch.tensor([0, 64])
        key = magi.magi_attn_varlen_key(cu, cu, HEADS_Q, HEADS_KV, HEAD_DIM, 0, torch.distributed.group.WORLD,
                                        causal=True, chunk_size=16)
        q = torch.randn(64, HEADS_Q, HEAD_DIM, dtype=torch.bfloat16)
        kv = torch.randn(64, HEADS_KV, HEAD_DIM, dtype=torch.bfloat16)
        monkeypatch.delenv(magi.KERNEL_ENV, raising=False)
        assert magi._pick_kernel(q, key) == "torch"
        for choice, message in [("fa4", "FlashAttention-4 cannot run: it runs on Hopper and Blackwell GPUs"),
                                ("flex", "needs a CUDA device"), ("sdpa", "needs a CUDA device"),
                                ("cudnn", "use one of auto, fa4, sdpa, flex, torch")]:
            monkeypatch.setenv(magi.KERNEL_ENV, choice)
            with pytest.raises((RuntimeError, ValueError), match=message):
                magi.calc_attn(q, kv, kv, key)
        monkeypatch.setenv(magi.KERNEL_ENV, "torch")
        assert magi.calc_attn(q, kv, kv, key)[0].shape == q.shape
    finally:
        torch.distributed.destroy_process_group()


# An exit handler registered before magi_portable is imported runs after magi_portable's own.
EXIT_SCRIPT = """
import atexit, os, sys

def count_gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    print("gloo threads at exit:", sum("gloo" in name for name in names), flush=True)

atexit.register(count_gloo_threads)
import torch
import torch.distributed as dist
import magi_portable as magi

dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
cu = torch.tensor([0, 16], dtype=torch.int32)
magi.magi_attn_varlen_key(cu, cu, 2, 1, 8, 0, dist.new_group([0]), causal=True, chunk_size=8)
dist.destroy_process_group()
"""


def test_cached_keys_let_go_of_their_process_group_at_exit(tmp_path):
    # A gloo group's threads outlive destroy_process_group() while a key holds the group; joined during the
    # interpreter's shutdown, they can abort a finished run. So none may be left once the exit handlers have run.
    result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "store")], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "gloo threads at exit: 0", result.stdout
