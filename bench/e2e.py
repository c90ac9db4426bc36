"""Run run_origin_clm.py or run_magi_clm.py unchanged and report steady-state tokens/s and peak GPU memory.

    torchrun --standalone --nproc_per_node 1 bench/e2e.py --results bench/results/e2e.jsonl \
        run_magi_clm.py --cp_size 1 --block_size 8192 ... (the script's own arguments)

With several processes, tokens/s count one batch per data-parallel replica (processes / --cp_size).

The script runs as __main__ through runpy. Around it, never inside its training step, this adds:
- a TrainerCallback (through transformers.trainer.DEFAULT_CALLBACKS) that synchronizes the GPU at the end of every
  step and times the steps after --warmup_steps;
- model initialisation on the GPU (from_config under a torch.device context): random init of 1.2B parameters on
  the CPU takes most of a minute and measures nothing. Both scripts get the same weights (same seed), in
  --weights_dtype;
- no final save (save_model, _save, save_state): writing 5 GB of weights is not training;
- optionally (--profile_step) torch.profiler's table of one step;
- optionally (--memory_snapshot) a record of every GPU allocation from before the model is built, saved as a snapshot
  and summed at the peak by the line that allocated it (bench/memory_peak.py);
- optionally (--gpu_memory_gib) a cap on the GPU memory torch may allocate, to stand in for a smaller card.
One JSON line per run is appended to --results: tokens/s, step time, model-FLOP utilisation, peak allocated and
reserved GPU memory, peak host memory, the loss of every step; or the out-of-memory error.

Model-FLOP utilisation (mfu) counts 6 x matmul parameters (every nn.Linear, the LM head included) + 6 x layers x
heads x head_dim x tokens (causal attention, forward and backward) per token, recomputation not counted, against
PEAK_TFLOPS dense bf16 TFLOP/s per GPU (989, an H100's or H200's).
"""

import argparse
import json
import os
import pickle
import resource
import runpy
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from memory_peak import peak_breakdown

PEAK_TFLOPS = 989


def flops_per_token(model, seq_len):
    config = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6 * matmul_params + 6 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len


class StepTimer(TrainerCallback):
    def __init__(self, profile_step):
        self.first_step_begin, self.step_ends, self.losses = None, [], []
        self.profile_step, self.profiler = profile_step, None
        self.untimed_s = 0.0  # the profile's table is built between two steps: left out of the timeline

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model_class = type(model).__name__  # FSDP2 names its wrapped classes FSDP<class>

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step_begin is None:
            torch.cuda.synchronize()
            self.first_step_begin = time.perf_counter()
        if state.global_step + 1 == self.profile_step:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter() - self.untimed_s)
        if self.profiler is not None:
            table_begin = time.perf_counter()
            self.profiler.stop()
            print(f"PROFILE of step {state.global_step}, GPU kernels by total time:\n" + self.profiler.key_averages().table(
                sort_by="self_device_time_total", row_limit=25, max_name_column_width=70), flush=True)
            self.profiler = None
            self.untimed_s += time.perf_counter() - table_begin

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="JSON lines file to append this run's result to")
    parser.add_argument("--warmup_steps", type=int, default=2,
                        help="steps left out of the timing (0: time every step, the first with its compiles)")
    parser.add_argument("--profile_step", type=int, help="print torch.profiler's table of this step (1-based)")
    parser.add_argument("--memory_snapshot", help="record GPU allocations, write the snapshot here (rank 0) and print "
                        "what holds the peak (the recording slows the steps a little)")
    parser.add_argument("--weights_dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the initialised weights, and so of their gradients and AdamW state. The scripts "
                        "build the model in float32 (--bf16 then trains under autocast); bfloat16 is the setting of "
                        "the README's tables")
    parser.add_argument("--gpu_memory_gib", type=float,
                        help="let torch allocate at most this much of the GPU (40: a 48 GB card, on a larger one)")
    parser.add_argument("script", help="run_origin_clm.py or run_magi_clm.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    script_arg = {name: value for name, value in zip(args.script_args, args.script_args[1:])}
    if "--gradient_accumulation_steps" in script_arg:
        raise SystemExit("bench/e2e.py counts the tokens of a step without gradient accumulation.")
    # One batch per data-parallel replica: the ranks of a CP group share theirs.
    data_parallel = int(os.environ.get("WORLD_SIZE", 1)) // int(script_arg.get("--cp_size", 1))
    tokens_per_step = int(script_arg["--block_size"]) * int(script_arg.get("--per_device_train_batch_size", 8)) \
        * data_parallel

    timer = StepTimer(args.profile_step)
    transformers.trainer.DEFAULT_CALLBACKS.append(timer)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if args.gpu_memory_gib:
        torch.cuda.set_per_process_memory_fraction(
            args.gpu_memory_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory, device)
    from_config = AutoModelForCausalLM.from_config
    models = []

    def from_config_on_gpu(*a, **kw):
        # Built in --weights_dtype: an 8B model built in float32 first would take 32 GB of a capped GPU.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, args.weights_dtype))
        try:
            with device:
                models.append(from_config(*a, **kw))
        finally:
            torch.set_default_dtype(default_dtype)
        return models[-1]

    AutoModelForCausalLM.from_config = from_config_on_gpu
    Trainer.save_model = lambda self, *a, **kw: None
    Trainer._save = lambda self, *a, **kw: None  # the scripts' final save under FSDP's sharded checkpoints
    Trainer.save_state = lambda self: None

    result = {"script": os.path.basename(args.script), "cp_size": int(script_arg.get("--cp_size", 1)),
              "processes": int(os.environ.get("WORLD_SIZE", 1)), "tokens_per_step": tokens_per_step,
              "weights_dtype": args.weights_dtype,
              "gradient_checkpointing": "--gradient_checkpointing" in args.script_args,
              "liger": "--use_liger_kernel" in args.script_args, "bf16_autocast": "--bf16" in args.script_args,
              "gpu_memory_gib": args.gpu_memory_gib,
              "fsdp": script_arg.get("--fsdp")}
    if args.memory_snapshot:
        torch.cuda.memory._record_memory_history(stacks="python")
    sys.argv = [args.script] + args.script_args
    sys.path[0] = os.path.dirname(os.path.abspath(args.script))  # as `python script.py` would have it
    try:
        runpy.run_path(args.script, run_name="__main__")
    except torch.OutOfMemoryError as error:
        result.update(status="OOM", error=str(error).splitlines()[0])
    else:
        marks = [timer.first_step_begin] + timer.step_ends  # the first step's start, then every step's end
        timed = marks[args.warmup_steps :]
        if len(timed) < 2:
            raise SystemExit(f"ran {len(timer.step_ends)} steps: need more than --warmup_steps {args.warmup_steps}")
        step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
        step_times = [round(b - a, 4) for a, b in zip(marks, marks[1:])]
        result.update(status="ok", steps=len(timer.step_ends), timed_steps=len(timed) - 1, step_s=round(step_s, 4),
                      tokens_per_s=round(tokens_per_step / step_s), step_times_s=step_times, losses=timer.losses)
        gpus = int(os.environ.get("WORLD_SIZE", 1))
        flops = flops_per_token(models[0], int(script_arg["--block_size"])) * tokens_per_step / step_s
        result.update(mfu=round(flops / (PEAK_TFLOPS * 1e12 * gpus), 3), model_class=timer.model_class)
    result.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                  peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
                  peak_host_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    if os.environ.get("RANK", "0") == "0":  # memory is rank 0's: the ranks of a CP group hold equal shards
        if args.memory_snapshot:
            snapshot = torch.cuda.memory._snapshot()  # what torch.cuda.memory._dump_snapshot pickles
            with open(args.memory_snapshot, "wb") as f:
                pickle.dump(snapshot, f)
            print("\n".join(peak_breakdown(snapshot)), flush=True)
        print("E2E_RESULT " + json.dumps(result), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
