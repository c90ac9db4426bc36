"""The data each rank trains on, with CP 2 x DP 2 (4 CPU processes): the ranks of a CP group get the same samples,
the two data-parallel groups different ones, and the token count that normalizes a step's loss counts every
sample once, not once per CP rank. This is what accelerate's data loader makes of the device mesh's dimension
names, which accelerate 1.10 changed (magi_utils.MESH_DIM_NAMES): the test runs on both supported stacks. And the
gradients that DDP sums over those ranks are kept once, in DDP's buckets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import transformers
from packaging import version

import embedded_default

REPO = Path(__file__).resolve().parent.parent
CP_SIZE, DP_SIZE, PER_DEVICE_BATCH, GRAD_ACC, STEPS = 2, 2, 2, 2, 2


def test_cp_ranks_share_samples_and_dp_groups_split_them(tmp_path):
    embedded_default.prepare_default_corpus()  # once, before the ranks look for it
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "ACCELERATE_TORCH_DEVICE": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(CP_SIZE * DP_SIZE),
         "tests/cp_sharding_probe.py", "--cp_size", str(CP_SIZE), "--output_dir", str(tmp_path / "out"),
         "--do_train", "--max_steps", str(STEPS), "--per_device_train_batch_size", str(PER_DEVICE_BATCH),
         "--gradient_accumulation_steps", str(GRAD_ACC), "--block_size", "32", "--average_tokens_across_devices",
         "True", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--ddp_backend", "gloo",
         "--dataloader_num_workers", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(CP_SIZE * DP_SIZE)]
    assert all(len(records) == STEPS * GRAD_ACC for records in ranks)
    # One copy of the gradients: DDP's buckets hold them once it has summed them, at each step's last micro-batch
    # (the earlier ones run under no_sync, outside DDP's buckets).
    assert [m["gradients_in_ddp_buckets"] for m in ranks[0]] == [False, True] * STEPS

    # Ranks r * CP_SIZE ... (r + 1) * CP_SIZE - 1 form data-parallel group r.
    groups = [ranks[g * CP_SIZE:(g + 1) * CP_SIZE] for g in range(DP_SIZE)]
    for group in groups:
        for rank in group[1:]:
            assert [m["labels"] for m in rank] == [m["labels"] for m in group[0]]
    samples = [tuple(sample) for group in groups for m in group[0] for sample in m["labels"]]
    assert len(samples) == DP_SIZE * STEPS * GRAD_ACC * PER_DEVICE_BATCH
    assert len(set(samples)) == len(samples)  # no sample twice, within a step or across steps

    # transformers 5 counts the targets of the shifted labels, 4.51 the labels themselves.
    shifted = version.parse(transformers.__version__) >= version.parse("5.0.0")
    for step in range(STEPS):
        micro_batches = [m for group in groups for m in group[0] if m["step"] == step]
        targets = [sample[1:] if shifted else sample for m in micro_batches for sample in m["labels"]]
        expected = sum(t != -100 for sample in targets for t in sample)
        assert {m["num_items_in_batch"] for rank in ranks for m in rank if m["step"] == step} == {expected}
