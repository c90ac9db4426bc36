#!/bin/bash
# results_gpu.png: the seed's experiment at the scale of 2 GPUs. Llama-3.2-1B's layers (16 x hidden 2048, 32/8 heads,
# head_dim 64) with the embedded default's tokenizer (vocabulary 4096), random init, the embedded default corpus,
# blocks of 8192 tokens, global batch 8, --bf16, 200 steps of the full recipe's schedule (AdamW at 1e-5, cosine,
# weight decay 0.1, clipping at 1.0): the baseline (DDP 2) against CP 1 (DDP 2) and CP 2 (one CP group), same seed and
# data. Each run takes about 3 minutes on 2 H200s; run them one by one if a session limits a command's time:
#   bash bench/loss_alignment.sh origin; bash bench/loss_alignment.sh cp1; bash bench/loss_alignment.sh cp2
#   bash bench/loss_alignment.sh plot
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${LOSS_ALIGNMENT_DIR:-output/loss_alignment}
ARGS=(--model_type llama --block_size 8192 --bf16 --learning_rate 1e-5 --warmup_steps 0 --max_steps 200
  --config_overrides "hidden_size=2048,intermediate_size=8192,num_hidden_layers=16,num_attention_heads=32,num_key_value_heads=8,head_dim=64,vocab_size=4096,tie_word_embeddings=true,max_position_embeddings=8192"
  --save_strategy no --use_liger_kernel --disable_tqdm true)
RUNS=("$@"); [ $# -eq 0 ] && RUNS=(origin cp1 cp2 plot)
for run in "${RUNS[@]}"; do
  case $run in
    origin) PER_DEVICE_BATCH=1 OUTPUT_DIR=$OUT/origin bash run_origin_clm.sh "${ARGS[@]}" ;;
    cp1) CP_SIZE=1 PER_DEVICE_BATCH=1 OUTPUT_DIR=$OUT/magi_cp1 bash run_magi_clm.sh "${ARGS[@]}" ;;
    cp2) CP_SIZE=2 PER_DEVICE_BATCH=2 OUTPUT_DIR=$OUT/magi_cp2 bash run_magi_clm.sh "${ARGS[@]}" ;;
    plot) python3 bench/plot_results.py --baseline $OUT/origin --cp_runs $OUT/magi_cp1 $OUT/magi_cp2 --last_steps 100 \
            --out results_gpu.png --title "Llama-3.2-1B's layers, 8192-token blocks, global batch 8, bf16: 2 GPUs" ;;
    *) echo "usage: bash bench/loss_alignment.sh [origin] [cp1] [cp2] [plot]" >&2; exit 1 ;;
  esac
done
