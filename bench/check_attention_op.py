"""Check calc_attn's kernels as they run under `keep_attention_outputs` (long_context.py), on a GPU, at CP 1 or more.

    torchrun --standalone --nproc_per_node 1 bench/check_attention_op.py
    torchrun --standalone --nproc_per_node 2 bench/check_attention_op.py     # CP 2: the fa4 kernel's key copies

magi_portable runs its fa4 and torch kernels as one operator (magi_portable::attention) whose backward starts from
the operator's own out and lse, so that checkpointing can keep those and skip the kernel in the recomputation; its
sdpa kernel calls SDPA's own operators, which have such a backward already. For every kernel that can run here
(MAGI_ATTENTION_KERNEL_BACKEND set to each in turn), in bf16 with 32 query and 8 key/value heads of 128, on one causal
sample and on causal documents of mixed lengths:
1. calc_attn's out, lse, dq, dk and dv (with a gradient through lse too, but for sdpa, whose lse has none) against
   float32 attention by autograd, on the global tensors: the error must be at most twice that of the same attention
   in bf16, or 1e-2 (lse: 1e-3 absolute). For fa4 also against FlashAttention-4's own autograd function
   (flash_attn_varlen_func) on the same query ranges and key copies, the code path the operator replaces: the same
   out and lse to the bit, and the same gradients up to the order in which shared keys' gradients add up (1e-3).
2. A checkpointed layer (projections, calc_attn, output projection) with KeepAttentionOutputs against without: the
   attention operators run half as often, and the gradients are the same up to float32 rounding, 1e-5 (fa4: within
   twice what two runs without differ by, its backward adding up dq in no fixed order), with the kept outputs on the
   GPU and offloaded to CPU memory (CPUOffload, its copies on a stream of their own). Not for flex, whose outputs
   cannot be kept.
Prints one line per check and exits non-zero if one fails.
"""

import contextlib
import logging
import math
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import magi_portable as magi  # noqa: E402
from magi_portable.collectives import GatherKV  # noqa: E402
from magi_portable.kernels import fa4  # noqa: E402
from long_context import ATTENTION_OPS, CPUOffload, KeepAttentionOutputs  # noqa: E402

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
CASES = {"causal 4096": [4096], "documents 4100": [700, 1500, 33, 1867]}  # 4100: a pad tail at every CP size


def log(message):
    if dist.get_rank() == 0:
        print(message, flush=True)


def reference_attention(q, k, v, lengths):
    """Causal attention within each document, dense, by autograd ([tokens, heads, d]); returns out and lse."""
    document = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                       torch.tensor(lengths, device=q.device))
    allowed = (document[:, None] == document[None, :]) & torch.ones(len(document), len(document), dtype=torch.bool,
                                                                     device=q.device).tril()
    k, v = (t.repeat_interleave(HEADS_Q // HEADS_KV, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM**-0.5
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v), lse.T


def global_outputs(attend, inputs, grad_out, grad_lse):
    """out, lse and the gradients of q, k, v (all global) of attend(q, k, v) -> (out, lse), by autograd (through lse
    too unless grad_lse is None)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = attend(*inputs)
    loss = (out.float() * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (lse.float() * grad_lse).sum()
    loss.backward()
    return [out.detach().float(), lse.detach().float()] + [t.grad.float() for t in inputs]


def calc_attn_global(key):
    def attend(q, k, v):
        out, meta = magi.calc_attn(*(magi.dispatch(t, key) for t in (q, k, v)), key)
        return magi.undispatch(out, key), magi.undispatch(meta.lse, key)

    return attend


def fa4_autograd_global(key):
    """The fa4 kernel's layout (query ranges, a copy of each one's keys, the pad tail) through FlashAttention-4's own
    autograd function, as calc_attn ran it before its kernels became an operator."""
    from flash_attn.cute import flash_attn_varlen_func

    layout, num_pad = fa4.layout(key), key.plan.num_local_pad

    def attend(q, k, v):
        q, k, v = (magi.dispatch(t, key) for t in (q, k, v))
        if key.cp_size > 1:
            kv = GatherKV.apply(torch.cat([k, v], dim=1), key.cp_group)
            k, v = kv.split(HEADS_KV, dim=1)
        k, v = (t[: layout.num_keys] if layout.key_index is None else t.index_select(0, layout.key_index)
                for t in (k, v))
        out, lse = flash_attn_varlen_func(
            q[: len(q) - num_pad], k, v, cu_seqlens_q=layout.cu_seqlens_q, cu_seqlens_k=layout.cu_seqlens_k,
            max_seqlen_q=layout.max_seqlen_q, max_seqlen_k=layout.max_seqlen_k, softmax_scale=HEAD_DIM**-0.5,
            causal=True, return_lse=True,
        )
        out = torch.cat([out, out.new_zeros((num_pad, *out.shape[1:]))])
        lse = torch.cat([lse.T, lse.new_full((num_pad, HEADS_Q), -math.inf)])
        return magi.undispatch(out, key), magi.undispatch(lse, key)

    return attend


def errors(got, want, names):
    """Relative error of each tensor (the norm of the difference over the reference's); lse: the largest difference."""
    return [(g - w).abs().max().item() if name == "lse" else ((g - w).norm() / w.norm()).item()
            for name, g, w in zip(names, got, want)]


NAMES = ("out", "lse", "dq", "dk", "dv")


def check_against_references(kernel, case, key, inputs, grad_out, grad_lse, lengths):
    def reference(q, k, v):
        return reference_attention(q, k, v, lengths)

    float32 = global_outputs(reference, [t.float() for t in inputs], grad_out, grad_lse)
    bf16_errors = errors(global_outputs(reference, inputs, grad_out, grad_lse), float32, NAMES)
    got = global_outputs(calc_attn_global(key), inputs, grad_out, grad_lse)
    got_errors = errors(got, float32, NAMES)
    bounds = [1e-3 if name == "lse" else max(2 * e, 1e-2) for name, e in zip(NAMES, bf16_errors)]
    ok = all(e <= b for e, b in zip(got_errors, bounds))
    report = ", ".join(f"{n} {e:.1e} (bf16 {b:.1e})" for n, e, b in zip(NAMES, got_errors, bf16_errors))
    log(f"{'ok  ' if ok else 'FAIL'} {kernel:5s} {case}, CP {key.cp_size}: against float32 autograd: {report}")
    if kernel == "fa4":
        fa4_outputs = global_outputs(fa4_autograd_global(key), inputs, grad_out, grad_lse)
        same_forward = torch.equal(got[0], fa4_outputs[0]) and torch.equal(got[1], fa4_outputs[1])
        grad_errors = errors(got[2:], fa4_outputs[2:], NAMES[2:])
        fa4_ok = same_forward and all(e <= 1e-3 for e in grad_errors)
        log(f"{'ok  ' if fa4_ok else 'FAIL'} fa4   {case}, CP {key.cp_size}: against flash_attn_varlen_func's "
            f"autograd: out and lse {'identical' if same_forward else 'DIFFERENT'}, "
            + ", ".join(f"{n} {e:.1e}" for n, e in zip(NAMES[2:], grad_errors)))
        ok = ok and fa4_ok
    return ok


class CountAttentionOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.runs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.runs += func.name() in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def check_kept_outputs(kernel, case, key, x, weights):
    """A checkpointed layer with and without KeepAttentionOutputs: attention runs, gradients."""
    def layer(x, w_q, w_k, w_v, w_o):
        q, k, v = ((x @ w).unflatten(-1, (-1, HEAD_DIM)) for w in (w_q, w_k, w_v))
        out, _ = magi.calc_attn(q, k, v, key)
        return out.flatten(1) @ w_o

    results = {}
    offload = CPUOffload(num_layers=1)
    for name, context_fn in [("recomputed", None), ("recomputed again", None),
                             ("kept", KeepAttentionOutputs(math.inf, offload=None)),
                             ("kept, offloaded", KeepAttentionOutputs(math.inf, offload=offload))]:
        inputs = [t.detach().clone().requires_grad_() for t in (x, *weights)]
        counter = CountAttentionOps()
        kwargs = {} if context_fn is None else {"context_fn": context_fn}
        # As offload_decoder_saved_tensors runs a decoder: with the offload, the layer's inputs go to CPU memory too.
        offloaded = context_fn is not None and context_fn.offload is not None
        with counter:
            with offload.saving_for_backward() if offloaded else contextlib.nullcontext():
                out = checkpoint(layer, *inputs, use_reentrant=False, **kwargs)
            out.float().square().sum().backward()
        results[name] = (counter.runs, [out.detach().float()] + [t.grad.float() for t in inputs])
    runs, reference = results["recomputed"]

    def largest_difference(outputs):  # relative, over the layer's output and every gradient
        return max(((a - b).norm() / b.norm()).item() for a, b in zip(outputs, reference))

    # FlashAttention-4's backward adds up dq in no fixed order: where two runs of the same layer differ, the kept
    # outputs' gradients may differ by as much (twice that, or 1e-3). Elsewhere they differ by float32 rounding at
    # most (1e-5: cuDNN's backward on the offloaded outputs, copied back to other addresses, 1.6e-7 on an H200), where
    # a wrong layout gives O(1).
    noise = largest_difference(results["recomputed again"][1])
    bound = max(2 * noise, 1e-3) if noise > 0 else 1e-5
    ok, lines = True, [f"two runs without: gradients {'identical' if noise == 0 else f'differ by {noise:.1e}'}"]
    for name in ("kept", "kept, offloaded"):
        kept_runs, outputs = results[name]
        difference = largest_difference(outputs)
        ok = ok and difference <= bound and kept_runs == runs // 2 and runs > 0
        lines.append(f"{name}: {kept_runs} runs of attention operators (without: {runs}), gradients "
                     + ("identical" if difference == 0 else f"differ by {difference:.1e}"))
    log(f"{'ok  ' if ok else 'FAIL'} {kernel:5s} {case}, CP {key.cp_size}: checkpointed layer: " + "; ".join(lines))
    return ok


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench/check_attention_op.py needs a CUDA GPU.")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", timeout=timedelta(minutes=10))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cp_size, device = dist.get_world_size(), torch.device("cuda")
    kernels = ["fa4", "sdpa", "flex", "torch"] if cp_size == 1 else ["fa4", "flex", "torch"]
    failed = []
    for kernel in kernels:
        os.environ[magi.KERNEL_ENV] = kernel
        for case, lengths in CASES.items():
            try:
                gen = torch.Generator(device).manual_seed(0)  # the same tensors on every rank
                total = sum(lengths)
                cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
                chunk_size = magi.default_chunk_size(total, cp_size)
                key = magi.magi_attn_varlen_key(cu_seqlens, cu_seqlens, HEADS_Q, HEADS_KV, HEAD_DIM,
                                                magi.compute_pad_size(total, cp_size, chunk_size), dist.group.WORLD,
                                                causal=True, chunk_size=chunk_size)
                inputs = [torch.randn(total, heads, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
                          for heads in (HEADS_Q, HEADS_KV, HEADS_KV)]
                grad_out = torch.randn(total, HEADS_Q, HEAD_DIM, device=device, generator=gen)
                grad_lse = torch.randn(total, HEADS_Q, device=device, generator=gen)
                if kernel == "sdpa":
                    grad_lse = None  # SDPA's kernels give their lse no gradient
                ok = check_against_references(kernel, case, key, inputs, grad_out, grad_lse, lengths)
                hidden = 512
                x = magi.dispatch(torch.randn(total, hidden, device=device, dtype=torch.bfloat16, generator=gen), key)
                weights = [torch.randn(hidden, heads * HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
                           / hidden**0.5 for heads in (HEADS_Q, HEADS_KV, HEADS_KV)]
                weights.append(torch.randn(HEADS_Q * HEAD_DIM, hidden, device=device, dtype=torch.bfloat16,
                                           generator=gen) / (HEADS_Q * HEAD_DIM) ** 0.5)
                if kernel != "flex":  # its outputs cannot be kept (and it is an operator a dispatch mode cannot count)
                    ok = check_kept_outputs(kernel, case, key, x, weights) and ok
            except Exception:
                traceback.print_exc()
                log(f"FAIL {kernel:5s} {case}, CP {cp_size}: raised (above)")
                ok = False
            if not ok:
                failed.append(f"{kernel} {case}")
            torch.cuda.empty_cache()
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CP {cp_size}: "
        + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
