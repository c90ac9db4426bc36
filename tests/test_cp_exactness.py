"""Context parallelism trains exactly like the baseline: real multi-process CPU runs (gloo, float32) of both
launchers with the same global batch, compared step by step.

Every run uses 2 samples per device and blocks of 100 tokens: 200 tokens per batch, which no cp x chunk
divides at cp 2 or 4 (chunk 13 or 7), so the padded path is exercised throughout. With --document_masking the
documents are the text's paragraphs (speeches, mostly tens of tokens), so the blocks hold several each.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
STEPS = 10
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


# Each kind of run once: CP 2 with document masking, CP 4 (chunks of 7 tokens), and CP 2 x DP 2, whose data-parallel
# reduction and masks of documents crossing the ranks' slices differ again. (The launchers' default, CP 2 without
# document masking, against the baseline: tests/test_resume.py.)
@pytest.mark.parametrize("cp_size, data_parallel, document_masking", [
    (2, 1, True), (4, 1, False), (2, 2, True),
], ids=["cp2-dp1-document_masking", "cp4-dp1", "cp2-dp2-document_masking"])
def test_cp_run_matches_the_baseline(baseline, tmp_path, cp_size, data_parallel, document_masking):
    cp_run = launch("run_magi_clm.sh", tmp_path / "cp", nproc=cp_size * data_parallel, cp_size=cp_size,
                    extra=run_args(data_parallel, document_masking))
    assert f"Context parallelism over {cp_size} ranks, attention by magi_portable" in cp_run["log"]
    # A plan of a new shape logs the batch's causal sequences: its samples, or with document masking the documents
    # and pieces of documents in them. The blocks do cross documents: several to a block.
    plans = [(int(samples), int(sequences)) for samples, sequences in
             re.findall(r"CP plan for (\d+) samples x 100 tokens, (\d+) causal sequences", cp_run["log"])]
    assert len(plans) == 1  # one shape of batch: training and evaluation take 2 samples a device
    samples = sum(p[0] for p in plans)
    sequences = sum(p[1] for p in plans)
    assert sequences >= 2 * samples if document_masking else sequences == samples
    assert f"Global batch: {GLOBAL_BATCH} samples a step" in cp_run["log"]
    assert_same_training(cp_run, baseline(data_parallel, document_masking))


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
