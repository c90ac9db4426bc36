#!/bin/bash
# run_magi_clm.py: context parallelism over CP_SIZE ranks (1, 2, 4 or 8), data parallelism over the rest.
# One process a GPU with NCCL, or CPU processes with gloo when there is no GPU. Edit the arguments below.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on each node.
# Paths (OUTPUT_DIR, --train_file, ...) are taken from the folder it is run from. PYTHON is the interpreter of the
# install, for every call (torchrun too): python3 unless set.
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

RECIPE=${RECIPE:-default}           # default: the embedded small Llama on Shakespeare; full: the seed's recipe
MODEL=${MODEL:-meta-llama/Llama-3.2-1B}  # RECIPE=full's model, e.g. meta-llama/Llama-3.1-8B (with FSDP=1)
CP_SIZE=${CP_SIZE:-2}               # ranks that share one sequence
OUTPUT_DIR=${OUTPUT_DIR:-output/magi_cp$CP_SIZE}
GLOBAL_BATCH=${GLOBAL_BATCH:-8}     # samples per optimizer step, as in run_origin_clm.sh
NNODES=${NNODES:-1}
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "NNODES=$NNODES is not a number of nodes: set NNODES to 1 or more" >&2
  exit 1
fi
if [ "$NNODES" -eq 1 ]; then
  RENDEZVOUS=(--standalone)           # a free local port, so that several runs can share a machine
else
  RENDEZVOUS=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0 to NNODES-1) on each node}"
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}" --master_port "${MASTER_PORT:-29500}")
fi

if [ "$RECIPE" = full ]; then
  # MODEL continued on OpenWebText at 8192 tokens: needs the Hub and GPUs. Checked at once, rather than after the
  # data loader's retries.
  export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0
  "$PYTHON" "$REPO/scripts/check_full_recipe.py" "$MODEL"
  PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}
  RECIPE_ARGS=(--model_name_or_path "$MODEL" --dataset_name Skylion007/openwebtext
    --trust_remote_code --block_size 8192 --bf16 --max_steps 2000 --learning_rate 1e-5
    --validation_split_percentage 1 --preprocessing_num_workers 32 --save_steps 500)
else
  PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-8}
  RECIPE_ARGS=(--block_size 256 --max_steps ${MAX_STEPS:-300} --learning_rate 2e-3 --warmup_steps 20
    --max_eval_samples 64 --save_steps 100)
fi

# FSDP=1: FSDP2 shards the parameters, gradients and optimizer state over all processes, and the checkpoints;
# OFFLOAD=1 with it keeps them in CPU memory, where the optimizer steps (docs/bigger_models.md). transformers 4.51
# hands fsdp_config's version and state dict type to no one: accelerate reads them from the environment.
FSDP_ARGS=()
if [ "${FSDP:-0}" = 1 ]; then
  export FSDP_VERSION=2 FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT
  FSDP_OPTIONS="full_shard auto_wrap"
  if [ "${OFFLOAD:-0}" = 1 ]; then FSDP_OPTIONS+=" offload"; fi
  FSDP_ARGS=(--fsdp "$FSDP_OPTIONS" --fsdp_config '{"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}')
elif [ "${OFFLOAD:-0}" = 1 ]; then
  echo "OFFLOAD=1 keeps FSDP's shards in CPU memory: set FSDP=1 too" >&2
  exit 1
fi

# Checked before the arithmetic below, where 0 would stop bash with a bare "division by 0".
if ! [[ "$CP_SIZE" =~ ^[1-9][0-9]*$ ]]; then
  echo "CP_SIZE=$CP_SIZE is not a positive number of ranks: set CP_SIZE to 1 (no CP), 2, 4 or 8" >&2
  exit 1
fi
if ! GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())"); then
  echo "$PYTHON cannot run torch: set PYTHON to the interpreter of your install (PYTHON=.venv/bin/python)" >&2
  exit 1
fi
if [ "$GPUS" -gt 0 ]; then
  NPROC=${NPROC:-$GPUS}
  DEVICE_ARGS=()
else
  NPROC=${NPROC:-$CP_SIZE}            # one CP group of CPU processes
  DEVICE_ARGS=(--use_cpu --ddp_backend gloo --dataloader_num_workers 0)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
  # accelerate names the device of several CPU processes "cpu:0", which torch.load cannot map the optimizer
  # state to when the Trainer resumes from a checkpoint: name it "cpu".
  export ACCELERATE_TORCH_DEVICE=cpu
fi
WORLD_SIZE=$(( NNODES * NPROC ))
if [ $(( WORLD_SIZE % CP_SIZE )) -ne 0 ]; then
  echo "CP_SIZE=$CP_SIZE does not divide the $WORLD_SIZE processes: change CP_SIZE or NPROC" >&2
  exit 1
fi
DP_SIZE=$(( WORLD_SIZE / CP_SIZE ))
GRAD_ACC=$(( GLOBAL_BATCH / (PER_DEVICE_BATCH * DP_SIZE) ))
if [ $(( GRAD_ACC * PER_DEVICE_BATCH * DP_SIZE )) -ne $GLOBAL_BATCH ]; then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH=$PER_DEVICE_BATCH x $DP_SIZE replicas" >&2
  exit 1
fi

# The scripts check that the arguments give GLOBAL_BATCH samples a step, however they are spelt.
export GLOBAL_BATCH
"$PYTHON" "$REPO/scripts/torchrun.py" "${RENDEZVOUS[@]}" --nproc_per_node "$NPROC" \
  "$REPO/run_magi_clm.py" --cp_size "$CP_SIZE" \
  --output_dir "$OUTPUT_DIR" \
  --do_train --do_eval \
  --per_device_train_batch_size $PER_DEVICE_BATCH --per_device_eval_batch_size $PER_DEVICE_BATCH \
  --gradient_accumulation_steps $GRAD_ACC \
  --lr_scheduler_type cosine --optim adamw_torch --weight_decay 0.1 --max_grad_norm 1.0 \
  --logging_steps 1 --eval_strategy no --save_strategy steps --save_total_limit 2 \
  --seed 42 --report_to none --ddp_find_unused_parameters False \
  --average_tokens_across_devices True \
  "${RECIPE_ARGS[@]}" "${FSDP_ARGS[@]}" "${DEVICE_ARGS[@]}" "$@"
