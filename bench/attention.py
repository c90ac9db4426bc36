"""Attention alone on one GPU: magi_portable.calc_attn at CP 1 against SDPA and compiled FlexAttention.

    python bench/attention.py --out bench/results/attention.txt

Forward + backward, bf16, 32 query heads and 8 key/value heads (GQA), head dims 64 and 128, for
- causal 8192 and 32768 tokens: one sample, so calc_attn runs SDPA's own kernel; compared with SDPA as
  transformers 4.51 calls it (K/V expanded to 32 heads, contiguous [b, h, s, d]), with SDPA on the unexpanded
  tensors (enable_gqa), with SDPA's FlashAttention-2 kernel, and (8192, d 64) with compiled FlexAttention;
- varlen: 32768 tokens of documents of mixed lengths (128 to 8192, seeded), each causal: calc_attn runs SDPA's own
  kernel once per document; compared with compiled FlexAttention given the usual document mask.
TFLOP/s count 4 * d * heads_q multiply-adds per visible (query, key) pair forward, 2.5x that backward.
Every case first checks calc_attn against the reference (output and lse).
"""

import argparse
import math
import random
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import magi_portable as magi  # noqa: E402

HEADS_Q, HEADS_KV = 32, 8
REPEATS = 10


def time_fwd_bwd(fn, inputs, grad_out):
    """Milliseconds per forward + backward: the median of 3 batches of REPEATS back-to-back runs, after 3 warm-up
    runs (compilation included). Back to back, as in training: the CPU queues the next run while the GPU works, so
    Python overhead shows only where it would stall the GPU."""
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad_out)

    for _ in range(3):
        run()
    batches = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(REPEATS):
            run()
        end.record()
        torch.cuda.synchronize()
        batches.append(start.elapsed_time(end) / REPEATS)
    return sorted(batches)[1]


def mixed_lengths(total, seed=0):
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(128, 8192), total - sum(lengths)))
    return lengths


def run_case(name, lengths, head_dim, group, with_flex, rows):
    torch._dynamo.reset()  # each case compiles for its own static shapes, as one training run would
    total = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    chunk_size = magi.default_chunk_size(total, 1)
    key = magi.magi_attn_varlen_key(
        cu_seqlens, cu_seqlens, HEADS_Q, HEADS_KV, head_dim, magi.compute_pad_size(total, 1, chunk_size), group,
        causal=True, chunk_size=chunk_size,
    )
    # [tokens, heads, d] as the model hands them over: the [b, h, s, d] views below are [b, s, h, d] in memory.
    q = torch.randn(total, HEADS_Q, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, HEADS_KV, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, HEADS_KV, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(q)
    q4, k4, v4 = (rearrange(t, "s h d -> 1 h s d") for t in (q, k, v))
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    tflop = 3.5 * 4 * head_dim * HEADS_Q * pairs / 1e12

    def portable():
        return magi.calc_attn(q, k, v, key)[0]

    funcs = {"portable calc_attn": portable}
    if len(lengths) == 1:
        def sdpa_hf():  # transformers 4.51's sdpa_attention_forward: repeat_kv, then contiguous
            group_size = HEADS_Q // HEADS_KV
            k_rep, v_rep = (t.repeat_interleave(group_size, dim=1).contiguous() for t in (k4, v4))
            out = F.scaled_dot_product_attention(q4.contiguous(), k_rep, v_rep, is_causal=True)
            return rearrange(out, "1 h s d -> s h d")

        def sdpa_gqa():
            return rearrange(F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True),
                             "1 h s d -> s h d")

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa_gqa()

        funcs.update({"SDPA, HF 4.51 call (KV expanded)": sdpa_hf, "SDPA enable_gqa": sdpa_gqa,
                      "SDPA flash, enable_gqa": sdpa_flash})
        reference = sdpa_hf
    if with_flex:
        doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(document_causal, None, None, total, total, device="cuda", _compile=True)
        compiled_flex = torch.compile(flex_attention)

        def flex():
            return rearrange(compiled_flex(q4, k4, v4, block_mask=block_mask, enable_gqa=True), "1 h s d -> s h d")

        funcs["compiled flex_attention"] = flex
        if len(lengths) > 1:
            reference = flex

    # Correctness: output against the reference kernel, lse against float32 math on a few query rows. (With
    # autograd on, so that compiled kernels are compiled once, for training.)
    out, meta = magi.calc_attn(q, k, v, key)
    ref = reference()
    with torch.no_grad():
        out_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows_checked = torch.linspace(0, total - 1, 64, device="cuda").long()
        scores = torch.einsum("qhd,khd->hqk", q[rows_checked].float(),
                              k.float().repeat_interleave(HEADS_Q // HEADS_KV, dim=1)) * head_dim**-0.5
        doc_of = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                         torch.tensor(lengths, device="cuda"))
        visible = (doc_of[rows_checked, None] == doc_of[None, :]) & (
            torch.arange(total, device="cuda")[None, :] <= rows_checked[:, None])
        lse_ref = torch.logsumexp(scores.masked_fill(~visible, -math.inf), dim=-1).T
        lse_err = (meta.lse[rows_checked] - lse_ref).abs().max().item()
    del out, meta, ref
    print(f"{name} d{head_dim}: calc_attn vs reference: relative output error {out_err:.2e}, max lse error "
          f"{lse_err:.2e}", flush=True)
    if not (out_err < 1e-2 and lse_err < 1e-2):
        raise RuntimeError(f"calc_attn disagrees with the reference on {name} d{head_dim}")
    if len(lengths) == 1:
        choice = SDPBackend(torch._fused_sdp_choice(q4, k4, v4, None, 0.0, True, enable_gqa=True)).name
        print(f"  SDPA picks {choice} for the unexpanded GQA tensors", flush=True)

    timings = {label: time_fwd_bwd(fn, (q, k, v), grad_out) for label, fn in funcs.items()}
    for label, ms in timings.items():
        rows.append((name, head_dim, label, ms, tflop / (ms / 1e3), ms / timings["portable calc_attn"]))
        print(f"  {label:34s} {ms:8.2f} ms {tflop / (ms / 1e3):7.1f} TFLOP/s", flush=True)
    del q, k, v, grad_out, key
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU.")
    # calc_attn takes a CP group: one process, so a gloo group of size 1 (no communication happens at CP 1).
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD

    rows, failed = [], []
    varlen = mixed_lengths(32768)
    print(f"varlen documents ({len(varlen)}): {varlen}", flush=True)
    for head_dim in (64, 128):
        for name, lengths, with_flex in (("causal 8192", [8192], head_dim == 64), ("causal 32768", [32768], False),
                                         ("varlen 32768", varlen, True)):
            try:
                run_case(name, lengths, head_dim, group, with_flex, rows)
            except Exception:  # report, and still measure the other cases
                traceback.print_exc()
                failed.append(f"{name} d{head_dim}")

    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# {props.name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
        f"bf16, heads {HEADS_Q}/{HEADS_KV}, fwd+bwd, median of 3 batches of {REPEATS}",
        f"# varlen documents: {varlen}",
        f"{'case':14s} {'d':>4s} {'kernel':34s} {'ms':>8s} {'TFLOP/s':>8s} {'portable speed / this':>22s}",
    ]
    lines += [f"{case:14s} {d:4d} {label:34s} {ms:8.2f} {tflops:8.1f} {ratio:22.3f}"
              for case, d, label, ms, tflops, ratio in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    dist.destroy_process_group()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
