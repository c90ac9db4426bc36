"""Context parallelism trains exactly like the baseline: real multi-process CPU runs (gloo, float32) of both
launchers with the same global batch, compared step by step; and the ranks of CP 2 x DP 2 get their data as they
should. (The launchers' default, CP 2, against the baseline: tests/test_resume.py.)

Every run uses 2 samples per device and blocks of 100 tokens: 200 tokens per batch, which no cp x chunk divides at
cp 2 or 4 (chunk 13 or 7), so the padded path is exercised throughout. With --document_masking the documents are
the text's paragraphs (speeches, mostly tens of tokens), so the blocks hold several each.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import transformers
from packaging import version
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
GLOBAL_BATCH = 4
COMMON_ARGS = ["--block_size", "100", "--max_eval_samples", "12", "--save_strategy", "no", "--warmup_steps", "2"]
DOCUMENT_ARGS = ["--document_masking", "--text_sample_by", "paragraph"]


def launch(script, output_dir, nproc, cp_size=None, extra=(), env=None):
    env = {**os.environ, "OUTPUT_DIR": str(output_dir), "MAX_STEPS": str(STEPS), "NPROC": str(nproc),
           "GLOBAL_BATCH": str(GLOBAL_BATCH), "PER_DEVICE_BATCH": "2", "OMP_NUM_THREADS": "1", **(env or {})}
    if cp_size is not None:
        env["CP_SIZE"] = str(cp_size)
    result = subprocess.run(
        ["bash", script, *COMMON_ARGS, *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {
        "log": result.stdout + result.stderr,
        "losses": [h["loss"] for h in state["log_history"] if "loss" in h],
        "total_flos": state["total_flos"],
        "train": json.loads((output_dir / "train_results.json").read_text()),
        "eval": json.loads((output_dir / "eval_results.json").read_text()),
        "params": load_file(output_dir / "model.safetensors"),
    }


def run_args(data_parallel, document_masking):
    return (["--average_tokens_across_devices", "True"] if data_parallel > 1 else []) + \
        (DOCUMENT_ARGS if document_masking else [])


def assert_same_training(cp_run, baseline):
    assert len(cp_run["losses"]) == len(baseline["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(cp_run["losses"], baseline["losses"]), 1):
        assert abs(a - b) <= 1e-4, f"step {step}: loss {a} with CP, {b} without"
    assert baseline["losses"][-1] < baseline["losses"][0]  # it trained
    for name, reference in baseline["params"].items():
        error = (cp_run["params"][name] - reference).norm() / reference.norm()
        assert error <= 1e-4, f"{name}: relative difference {error:.2e}"
    assert abs(cp_run["eval"]["eval_loss"] - baseline["eval"]["eval_loss"]) <= 1e-4
    assert cp_run["eval"]["eval_accuracy"] == pytest.approx(baseline["eval"]["eval_accuracy"], abs=1e-6)
    assert cp_run["eval"]["perplexity"] == pytest.approx(baseline["eval"]["perplexity"], rel=1e-4)
    # The same work is reported: each sample counted once, not once per rank of its CP group.
    assert cp_run["total_flos"] == pytest.approx(baseline["total_flos"], rel=1e-9)
    for run in (cp_run, baseline):
        samples = run["train"]["train_samples_per_second"] * run["train"]["train_runtime"]
        assert samples == pytest.approx(STEPS * GLOBAL_BATCH, rel=0.01)


def assert_cp_plans(run, cp_size, document_masking):
    assert f"Context parallelism over {cp_size} ranks, attention by magi_portable" in run["log"]
    # A plan of a new shape logs the batch's causal sequences: its samples, or with document masking the documents
    # and pieces of documents in them. The blocks do cross documents: several to a block.
    plans = [(int(samples), int(sequences)) for samples, sequences in
             re.findall(r"CP plan for (\d+) samples x 100 tokens, (\d+) causal sequences", run["log"])]
    assert len(plans) == 1  # one shape of batch: training and evaluation take 2 samples a device
    [(samples, sequences)] = plans
    assert sequences >= 2 * samples if document_masking else sequences == samples
    assert f"Global batch: {GLOBAL_BATCH} samples a step" in run["log"]


def test_cp4_run_matches_the_baseline(baseline, tmp_path):
    run = launch("run_magi_clm.sh", tmp_path / "cp", nproc=4, cp_size=4)
    assert_cp_plans(run, 4, document_masking=False)
    assert_same_training(run, baseline(1, False))


def test_cp2_x_dp2_run_splits_the_data_and_matches_the_baseline(baseline, tmp_path):
    """With document masking, each rank recording what it trains on (tests/sharding_probe): this is what
    accelerate's data loader makes of the device mesh's dimension names, which accelerate 1.10 changed
    (magi_utils.MESH_DIM_NAMES). CI runs it on both stacks."""
    probe = tmp_path / "probe"
    probe.mkdir()
    run = launch("run_magi_clm.sh", tmp_path / "cp", nproc=4, cp_size=2, extra=run_args(2, True), env={
        "PYTHONPATH": str(REPO / "tests" / "sharding_probe"), "SHARDING_PROBE_DIR": str(probe)})
    assert_cp_plans(run, 2, document_masking=True)
    assert_same_training(run, baseline(2, True))

    cp_size, data_parallel, per_device = 2, 2, 2
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(cp_size * data_parallel)]
    assert all(len(records) == STEPS for records in ranks)
    # One copy of the gradients: DDP's buckets hold them once it has summed them.
    assert all(m["gradients_in_ddp_buckets"] for rank in ranks for m in rank)
    # Ranks r * cp_size ... (r + 1) * cp_size - 1 form data-parallel group r: the ranks of a group get the same
    # samples, the groups different ones.
    groups = [ranks[g * cp_size:(g + 1) * cp_size] for g in range(data_parallel)]
    for group in groups:
        for rank in group[1:]:
            assert [m["labels"] for m in rank] == [m["labels"] for m in group[0]]
    samples = [tuple(sample) for group in groups for m in group[0] for sample in m["labels"]]
    assert len(samples) == data_parallel * STEPS * per_device
    assert len(set(samples)) == len(samples)  # no sample twice, within a step or across steps
    # The token count that normalizes a step's loss counts every sample once, not once per CP rank (transformers 5
    # counts the targets of the shifted labels, 4.51 the labels themselves).
    shifted = version.parse(transformers.__version__) >= version.parse("5.0.0")
    for step in range(STEPS):
        micro_batches = [m for group in groups for m in group[0] if m["step"] == step]
        targets = [sample[1:] if shifted else sample for m in micro_batches for sample in m["labels"]]
        expected = sum(t != -100 for sample in targets for t in sample)
        assert {m["num_items_in_batch"] for rank in ranks for m in rank if m["step"] == step} == {expected}


def test_cp_run_with_the_memory_options_matches_the_baseline(baseline, tmp_path):
    """Under CP 2, with document masking: checkpointed layer inputs offloaded, the attention outputs of the first
    layer kept for its recomputation (offloaded too), and the MLP in tiles of 37 tokens (long_context.py)."""
    options = ["--gradient_checkpointing", "--gradient_checkpointing_kwargs",
               '{"offload": true, "keep_attention_outputs": 1}', "--tiled_mlp_tokens", "37"]
    cp_run = launch("run_magi_clm.sh", tmp_path / "cp", nproc=2, cp_size=2, extra=[*options, *DOCUMENT_ARGS])
    assert "keeps the checkpointed layer inputs in CPU memory" in cp_run["log"]
    assert ("keeps the attention outputs of the first 1 checkpointed layers for the backward in CPU memory"
            in cp_run["log"])
    assert "MLP runs over tiles of 37 tokens" in cp_run["log"]
    assert_same_training(cp_run, baseline(1, True))
