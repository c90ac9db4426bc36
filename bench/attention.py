"""Attention alone: magi_portable.calc_attn against FlashAttention-4 called directly, at CP 1 and CP 2.

    torchrun --standalone --nproc_per_node 1 bench/attention.py --out bench/results/attention_cp1.txt
    torchrun --standalone --nproc_per_node 2 bench/attention.py --out bench/results/attention_cp2.txt

Forward + backward, bf16, 32 query heads and 8 key/value heads (GQA), head dims 64 and 128, for causal 32768 and
131072 tokens (one sample) and varlen 131072 tokens (causal documents of 512 to 16384 tokens, seeded).
- CP 1 (one process): calc_attn (the kernel it picks, or MAGI_ATTENTION_KERNEL_BACKEND's) against FA4 called
  directly on the same tensors (flash_attn_func for one sample, flash_attn_varlen_func for documents).
- CP 2 (one process per GPU, NCCL): calc_attn on each rank's shard, all-gather and reduce-scatter included, against
  one GPU running FA4 on the whole sequence (timed on rank 0 while the other ranks wait). Per-GPU TFLOP/s count half
  the work; efficiency = (one GPU's time / 2) / CP 2's time, 1.0 being a perfect split.
Every case is first checked against SDPA: output and dq, dk, dv of calc_attn (gathered back to the global order) and of
SDPA in bf16 against SDPA in float32; calc_attn's error must be at most twice SDPA's bf16 error (or 1e-3, whichever
is larger). The first call at a new shape (FA4 compiles its kernels then) is timed against the later ones.
TFLOP/s count 4 * d * heads_q multiply-adds per visible (query, key) pair forward, 2.5x that backward.
"""

import argparse
import os
import random
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import magi_portable as magi  # noqa: E402

HEADS_Q, HEADS_KV = 32, 8


def run_fwd_bwd(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    fn().backward(grad_out)


def first_call_ms(fn, inputs, grad_out):
    """Milliseconds of one forward + backward, synchronized: for the first call at a shape, compiling included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    run_fwd_bwd(fn, inputs, grad_out)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def time_fwd_bwd(fn, inputs, grad_out, repeats):
    """Milliseconds per forward + backward: the median of 3 batches of back-to-back runs, after 2 warm-up runs."""
    for _ in range(2):
        run_fwd_bwd(fn, inputs, grad_out)
    batches = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            run_fwd_bwd(fn, inputs, grad_out)
        end.record()
        torch.cuda.synchronize()
        batches.append(start.elapsed_time(end) / repeats)
    return sorted(batches)[1]


def mixed_lengths(total, seed=0):
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(512, 16384), total - sum(lengths)))
    return lengths


def sdpa_per_document(q, k, v, lengths):
    """SDPA on each document ([tokens, heads, d] in and out), K/V expanded to the query heads."""
    outs = []
    for qd, kd, vd in zip(*(t.split(lengths) for t in (q, k, v))):
        qd, kd, vd = (t.transpose(0, 1).unsqueeze(0) for t in (qd, kd, vd))
        kd, vd = (t.repeat_interleave(HEADS_Q // HEADS_KV, dim=1) for t in (kd, vd))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def check_against_sdpa(name, calc_attn_global, inputs, lengths, grad_out):
    """calc_attn's error against float32 SDPA must be at most twice bf16 SDPA's (or 1e-3)."""
    def outputs(fn, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*tensors)
        out.backward(grad_out.to(out.dtype))
        return [out.detach().float()] + [t.grad.float() for t in tensors]

    def sdpa(q, k, v):
        return sdpa_per_document(q, k, v, lengths)

    reference = outputs(sdpa, [t.float() for t in inputs])
    errors = {}
    for label, fn in (("SDPA bf16", sdpa), ("calc_attn", calc_attn_global)):
        got = outputs(fn, inputs)
        errors[label] = [((g - r).norm() / r.norm()).item() for g, r in zip(got, reference)]
        del got
    del reference
    torch.cuda.empty_cache()
    bounds = [max(2 * e, 1e-3) for e in errors["SDPA bf16"]]
    report = ", ".join(f"{n} {c:.2e} (SDPA {s:.2e})" for n, c, s in
                       zip(("out", "dq", "dk", "dv"), errors["calc_attn"], errors["SDPA bf16"]))
    log(f"{name}: error against float32 SDPA: {report}")
    if not all(c <= b for c, b in zip(errors["calc_attn"], bounds)):
        raise RuntimeError(f"calc_attn is less accurate than twice SDPA's bf16 error on {name}")


def log(message):
    if dist.get_rank() == 0:
        print(message, flush=True)


def run_case(name, lengths, head_dim, rows):
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    cp_size, device = dist.get_world_size(), torch.device("cuda", torch.cuda.current_device())
    total = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    chunk_size = magi.default_chunk_size(total, cp_size)
    key = magi.magi_attn_varlen_key(cu_seqlens, cu_seqlens, HEADS_Q, HEADS_KV, head_dim,
                                    magi.compute_pad_size(total, cp_size, chunk_size), dist.group.WORLD,
                                    causal=True, chunk_size=chunk_size)
    gen = torch.Generator(device).manual_seed(0)  # the same global tensors on every rank
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
               for heads in (HEADS_Q, HEADS_KV, HEADS_KV))
    grad_out = torch.randn(total, HEADS_Q, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    tflop = 3.5 * 4 * head_dim * HEADS_Q * pairs / 1e12

    def calc_attn_global(q, k, v):  # dispatch, attention, undispatch: gradients come back in the global order
        local = [magi.dispatch(t, key) for t in (q, k, v)]
        return magi.undispatch(magi.calc_attn(*local, key)[0], key)

    # The first call at this shape (FA4 compiles its kernels for it), before anything else runs calc_attn.
    local = [magi.dispatch(t, key).detach().requires_grad_() for t in (q, k, v)]
    local_grad = magi.dispatch(grad_out, key)
    first_ms = first_call_ms(lambda: magi.calc_attn(*local, key)[0], local, local_grad)
    check_against_sdpa(f"{name} d{head_dim} CP {cp_size}", calc_attn_global, (q, k, v), lengths, grad_out)

    def fa4_direct(q, k, v):
        if len(lengths) == 1:
            return flash_attn_func(q[None], k[None], v[None], causal=True)[0][0]
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                      max_seqlen_q=max(lengths), max_seqlen_k=max(lengths), causal=True)[0]

    repeats = 10 if total <= 32768 else 4
    ms = time_fwd_bwd(lambda: magi.calc_attn(*local, key)[0], local, local_grad, repeats)
    slowest = torch.tensor([ms, first_ms], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    ms, first_ms = slowest.tolist()
    # One GPU runs FA4 directly on the whole sequence (the same tensors at CP 1) while the other ranks wait.
    if dist.get_rank() == 0:
        full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fa4_ms = time_fwd_bwd(lambda: fa4_direct(*full), full, grad_out, repeats)
        del full
        ratio = (fa4_ms / cp_size) / ms  # at CP 1: calc_attn's speed / FA4's; at CP > 1: per-GPU efficiency
        label = "calc_attn" if cp_size == 1 else f"calc_attn CP {cp_size}, per GPU"
        rows.append((name, head_dim, "FA4 direct, 1 GPU", fa4_ms, tflop / (fa4_ms / 1e3), "", ""))
        rows.append((name, head_dim, label, ms, tflop / cp_size / (ms / 1e3), first_ms - ms, ratio))
        log(f"  FA4 on 1 GPU {fa4_ms:8.2f} ms; calc_attn at CP {cp_size} {ms:8.2f} ms "
            f"({tflop / cp_size / (ms / 1e3):.1f} TFLOP/s per GPU): {ratio:.3f}; "
            f"first call +{(first_ms - ms) / 1e3:.1f} s; "
            f"area imbalance {key.attn_area_imbalance:.3f}, query ranges on rank 0: {len(key.plan.query_ranges)}")
    dist.barrier()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--cases", default="causal32768,causal131072,varlen131072", help="comma-separated")
    parser.add_argument("--head_dims", default="64,128")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU.")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", timeout=timedelta(minutes=10))
    varlen = mixed_lengths(131072)
    cases = {"causal32768": [32768], "causal131072": [131072], "varlen131072": varlen}
    log(f"varlen documents ({len(varlen)}): {varlen}")

    rows, failed = [], []
    for head_dim in [int(d) for d in args.head_dims.split(",")]:
        for name in args.cases.split(","):
            try:
                log(f"{name} d{head_dim}, CP {dist.get_world_size()}")
                run_case(name, cases[name], head_dim, rows)
            except Exception:  # report, and still measure the other cases
                traceback.print_exc()
                failed.append(f"{name} d{head_dim}")
            torch.cuda.empty_cache()

    props = torch.cuda.get_device_properties(0)
    import flash_attn.cute
    lines = [
        f"# {dist.get_world_size()} x {props.name}, torch {torch.__version__}, flash-attn-4 "
        f"{getattr(flash_attn.cute, '__version__', '?')}, bf16, heads {HEADS_Q}/{HEADS_KV}, fwd+bwd, "
        f"kernel {os.environ.get(magi.KERNEL_ENV, 'auto')}",
        f"# varlen documents: {varlen}",
        f"{'case':14s} {'d':>4s} {'kernel':28s} {'ms':>9s} {'TFLOP/s':>8s} {'first call +ms':>15s} "
        f"{'vs FA4 (CP 1) / efficiency (CP > 1)':>36s}",
    ]
    for case, d, label, ms, tflops, first, ratio in rows:
        first = f"{first:15.0f}" if first != "" else f"{'':15s}"
        ratio = f"{ratio:36.3f}" if ratio != "" else ""
        lines.append(f"{case:14s} {d:4d} {label:28s} {ms:9.2f} {tflops:8.1f} {first} {ratio}")
    if dist.get_rank() == 0:
        table = "\n".join(lines)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
    dist.destroy_process_group()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
