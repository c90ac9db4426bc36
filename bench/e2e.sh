#!/bin/bash
# End-to-end: run_origin_clm.py against run_magi_clm.py --cp_size 1 on one GPU, same shape, same machine, same call.
#   bash bench/e2e.sh plain 8192 16384               # no gradient checkpointing, HF's cross-entropy on full logits
#   bash bench/e2e.sh gc_liger 8192 32768 131072     # gradient checkpointing + liger's fused linear cross-entropy
#   WEIGHTS=bfloat16 bash bench/e2e.sh ...           # bf16 weights/gradients/AdamW state (default: float32)
#   NPROC=2 SCRIPTS=run_magi_clm.py bash bench/e2e.sh gc_liger 262144   # CP over 2 GPUs (--cp_size NPROC)
#   EXTRA_ARGS="--document_masking" bash bench/e2e.sh ...                # more arguments for both scripts
#   E2E_ARGS="--memory_snapshot /tmp/snapshot.pickle" bash bench/e2e.sh ...  # what holds the peak (bench/memory_peak.py)
#   DOCS=scenes bash bench/e2e.sh ...   # the corpus as one document per scene (84 to 35k tokens), not 5000-line pieces
#   SHAPE=8b bash bench/e2e.sh ...      # Llama-3.1-8B's shape instead of Llama-3.2-1B's
#   FSDP=1 bash bench/e2e.sh ...        # FSDP2 over all processes; FSDP=offload: parameters and AdamW state in CPU memory
#   STEPS=4 WARMUP=2 bash bench/e2e.sh ...   # steps run and steps left out of the timing (default: by length)
#   E2E_ARGS="--gpu_memory_gib 40" bash bench/e2e.sh ...   # hold each process to a smaller card's memory
#   BF16=0 WEIGHTS=bfloat16 bash bench/e2e.sh ...   # no --bf16 autocast: pure bf16 training (accelerate's FSDP2 would
#                                                   # otherwise upcast bf16 weights to float32 master weights)
# Model: Llama-3.2-1B's shape (16 layers, hidden 2048, 32/8 heads, head_dim 64, vocab 128256, tied embeddings) or
# Llama-3.1-8B's (32 layers, hidden 4096, 32/8 heads, head_dim 128, intermediate 14336, vocab 128256, untied), random
# init, bf16 autocast, batch 1, fused AdamW, on the embedded default corpus. Results: $RESULTS (JSON lines).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Less fragmentation at long context (both scripts alike; it changes where tensors live, not what is computed).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
MODE=$1; shift
RESULTS=${RESULTS:-bench/results/e2e.jsonl}
WEIGHTS=${WEIGHTS:-float32}   # bfloat16: weights, gradients and AdamW state in bf16, as the README's tables use
FULL_LOG=${FULL_LOG:-/tmp/e2e_full.log}   # every run's whole output, appended
RUN_LOG=$(mktemp)
SCRIPTS=${SCRIPTS:-"run_origin_clm.py run_magi_clm.py"}
NPROC=${NPROC:-1}   # run_magi_clm.py gets --cp_size NPROC: one CP group over all of them
case $MODE in
  plain) MODE_ARGS=() ;;
  gc_liger) MODE_ARGS=(--gradient_checkpointing --use_liger_kernel) ;;
  *) echo "mode must be plain or gc_liger, got '$MODE'" >&2; exit 1 ;;
esac
# Data: the embedded default's text, as JSON documents of 5000 lines. Its .txt files are read one example per line,
# and group_texts drops the remainder of every 1000-line batch (about 10k tokens): no block longer than that.
# DOCS=scenes: one document per scene, cut before each scene heading; the text before the first heading (poems,
# sonnets: 482k tokens without scene headings) is left out.
DOCS=${DOCS:-chunks}
DATA=${DATA:-/tmp/e2e_data_$DOCS}   # separate folders for runs that share a machine
python3 - "$DATA" "$DOCS" <<'PY'
import json, re, sys
from pathlib import Path
from embedded_default import prepare_default_corpus
out, docs_kind = Path(sys.argv[1]), sys.argv[2]
out.mkdir(exist_ok=True)
for name, path in zip(("train", "validation"), prepare_default_corpus()[:2]):
    text = Path(path).read_text()
    if docs_kind == "scenes":
        docs = re.split(r"\n(?=(?:SCENE|Scene) )", text)[1:] or [text]
    else:
        lines = text.splitlines(keepends=True)
        docs = ["".join(lines[i : i + 5000]) for i in range(0, len(lines), 5000)]
    (out / f"{name}.json").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
PY
DATA_ARGS=(--train_file $DATA/train.json --validation_file $DATA/validation.json --tokenizer_name data/shakespeare/tokenizer)
BF16_ARG=(--bf16); [ "${BF16:-1}" = 0 ] && BF16_ARG=()
case ${SHAPE:-1b} in
  1b) MODEL="hidden_size=2048,intermediate_size=8192,num_hidden_layers=16,num_attention_heads=32,num_key_value_heads=8"
      MODEL+=",head_dim=64,vocab_size=128256,tie_word_embeddings=true" ;;
  8b) MODEL="hidden_size=4096,intermediate_size=14336,num_hidden_layers=32,num_attention_heads=32,num_key_value_heads=8"
      MODEL+=",head_dim=128,vocab_size=128256,tie_word_embeddings=false" ;;
  *) echo "SHAPE must be 1b or 8b, got '$SHAPE'" >&2; exit 1 ;;
esac
# FSDP2 through the Trainer's own arguments, sharded over every process (bench/fsdp_config.json); transformers 4.51
# reads the FSDP version from the environment only.
case ${FSDP:-0} in
  0) FSDP_ARGS=() ;;
  1) FSDP_ARGS=(--fsdp "full_shard auto_wrap" --fsdp_config bench/fsdp_config.json); export FSDP_VERSION=2 ;;
  offload) FSDP_ARGS=(--fsdp "full_shard auto_wrap offload" --fsdp_config bench/fsdp_config.json); export FSDP_VERSION=2 ;;
  *) echo "FSDP must be 0, 1 or offload, got '$FSDP'" >&2; exit 1 ;;
esac

for len in "$@"; do
  # Long steps take long: fewer of them (the first steps compile, allocate the optimizer state and warm up).
  # From 1048576 tokens (minutes a step): one step, timed with its first-call compiles.
  if [ "$len" -ge 1048576 ]; then steps=1; warmup=0
  elif [ "$len" -ge 131072 ]; then steps=$(( len >= 262144 ? 2 : 3 )); warmup=1; else steps=10; warmup=3; fi
  steps=${STEPS:-$steps}; warmup=${WARMUP:-$warmup}
  for script in $SCRIPTS; do
    extra=(); [ "$script" = run_magi_clm.py ] && extra=(--cp_size $NPROC)
    torchrun --standalone --nproc_per_node $NPROC bench/e2e.py --results "$RESULTS" --warmup_steps $warmup --weights_dtype $WEIGHTS ${E2E_ARGS:-} \
      "$script" "${extra[@]}" --model_type llama --config_overrides "$MODEL,max_position_embeddings=$len" \
      --block_size "$len" --per_device_train_batch_size 1 ${BF16_ARG[@]+"${BF16_ARG[@]}"} --optim adamw_torch_fused \
      --max_steps $steps --logging_steps 1 --save_strategy no --report_to none --do_train \
      --output_dir "$(mktemp -d /tmp/e2e_out.XXXX)" --disable_tqdm true "${DATA_ARGS[@]}" \
      "${MODE_ARGS[@]}" "${FSDP_ARGS[@]}" ${EXTRA_ARGS:-} > "$RUN_LOG" 2>&1
    rc=$?
    cat "$RUN_LOG" >> "$FULL_LOG"
    grep -m1 -o "calc_attn runs the .*" "$RUN_LOG"
    grep E2E_RESULT "$RUN_LOG" || { echo "FAILED (exit $rc): $script $MODE $len"; tail -40 "$RUN_LOG"; }
  done
done
