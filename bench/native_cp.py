"""The peer: torch's native context parallelism (ring attention over SDPA) on the end-to-end benchmark's shape.

    torchrun --standalone --nproc_per_node 2 bench/native_cp.py --results bench/results/e2e.jsonl --seq_len 262144
    ... --seq_len 1048576 --steps 1 --warmup_steps 0 --gpu_memory_gib 79   # does it fit in an H100's memory?

`torch.distributed.tensor.experimental.context_parallel` is what accelerate's ParallelismConfig(cp_size=...) runs
under the transformers 5 Trainer; here it runs in a plain training loop on the GPU image's transformers (5.x), on
the end-to-end benchmark's model: Llama-3.2-1B's shape (16 layers, hidden 2048, 32/8 heads, head_dim 64, vocab 128256, tied
embeddings), random init, bf16 weights, gradient checkpointing, liger's fused linear cross-entropy on each rank's
shard of the tokens, fused AdamW, batch 1, DDP over the CP ranks (the loss is scaled so that their gradients add
up). The sequence is sharded head-and-tail (context_parallel's load balancing), input ids, position ids and labels
alike. Under context_parallel, SDPA must be called with is_causal=True and no mask: an attention function that does
so is registered, with a mask function that builds none. Tokens are random ids of the embedded default's vocabulary.
One JSON line is appended to --results, as bench/e2e.py writes for our scripts.
"""

import argparse
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel
from torch.nn.parallel import DistributedDataParallel
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface


def sdpa_causal(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # context_parallel replaces SDPA by ring attention, which takes is_causal and no mask; K/V expanded to the
    # query heads, as transformers' own SDPA path does where SDPA cannot take grouped heads.
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("native_cp", sdpa_causal)
AttentionMaskInterface.register("native_cp", lambda *args, **kwargs: None)


class LossOnShard(torch.nn.Module):
    """The model's loss on this rank's tokens, over the whole sequence's token count, times the CP size: DDP
    averages the gradients over the ranks, so they add up to the whole sequence's."""

    def __init__(self, model, num_tokens, cp_size):
        super().__init__()
        self.model, self.num_tokens, self.cp_size = model, num_tokens, cp_size

    def forward(self, input_ids, position_ids, labels):
        hidden = self.model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        loss_sum = LigerFusedLinearCrossEntropyFunction.apply(
            hidden.flatten(0, 1), self.model.lm_head.weight, labels.flatten(), None, None, -100, 0.0, 0.0, "sum"
        )[0]
        return loss_sum / self.num_tokens * self.cp_size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True)
    parser.add_argument("--seq_len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=3,
                        help="steps left out of the timing (0: time every step, the first with its compiles)")
    parser.add_argument("--gpu_memory_gib", type=float,
                        help="let torch allocate at most this much of each GPU (79: an H100's 80 GB, on a larger card)")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    if args.gpu_memory_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_gib * 2**30 / total)
    dist.init_process_group("nccl", timeout=timedelta(minutes=20))
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000,
                         tie_word_embeddings=True, max_position_embeddings=args.seq_len)
    config._attn_implementation = "native_cp"
    torch.manual_seed(42)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    ddp = DistributedDataParallel(LossOnShard(model, args.seq_len - 1, world), device_ids=[device.index])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    result = {"script": "torch native context_parallel", "cp_size": world, "tokens_per_step": args.seq_len,
              "weights_dtype": "bfloat16", "gradient_checkpointing": True, "liger": "fused linear cross-entropy",
              "gpu_memory_gib": args.gpu_memory_gib}
    step_ends, losses = [], []
    torch.cuda.synchronize()
    first_step_begin = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(args.steps):
            input_ids = torch.randint(0, 4096, (1, args.seq_len), generator=generator).to(device)
            labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)
            position_ids = torch.arange(args.seq_len, device=device)[None]
            buffers = [input_ids, position_ids, labels]
            with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
                loss = ddp(input_ids, position_ids, labels)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            total = loss.detach() / world
            dist.all_reduce(total)
            losses.append(round(total.item(), 4))
    except torch.OutOfMemoryError as error:
        result.update(status="OOM", error=str(error).splitlines()[0])
    else:
        marks = [first_step_begin] + step_ends
        timed = marks[args.warmup_steps :]
        step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
        result.update(status="ok", steps=len(step_ends), timed_steps=len(timed) - 1, step_s=round(step_s, 4),
                      tokens_per_s=round(args.seq_len / step_s), losses=losses,
                      step_times_s=[round(b - a, 4) for a, b in zip(marks, marks[1:])])
    peak = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                        device=device, dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the fullest GPU
    result.update(peak_allocated_gib=round(peak[0].item() / 2**30, 2),
                  peak_reserved_gib=round(peak[1].item() / 2**30, 2))
    if rank == 0:
        print("E2E_RESULT " + json.dumps(result), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
