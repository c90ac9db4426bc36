"""Reliability: bad input stops every rank before training with a one-line error, an interrupted CP run resumes
exactly, runs are deterministic, and one failing rank stops the whole job.

Every run is real: CPU processes with gloo, through the launchers or started rank by rank.
"""

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import embedded_default
import magi_portable
import magi_utils
import run_magi_clm

REPO = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS, SAVE_STEPS, BLOCK_SIZE = 10, 5, 255
# Warm up over 2 steps so that the cosine decay is resumed too.
RUN_ARGS = ["--block_size", str(BLOCK_SIZE), "--warmup_steps", "2", "--save_steps", str(SAVE_STEPS),
            "--max_eval_samples", "8"]


def launch(script, output_dir, *args, env=None, timeout=300):
    env = {**os.environ, **ENV, "OUTPUT_DIR": str(output_dir), "MAX_STEPS": str(STEPS), **(env or {})}
    return subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train(script, output_dir, *args):
    """A launcher run of STEPS steps: its log, the logged entry of every step, and the final weights."""
    result = launch(script, output_dir, *RUN_ARGS, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {
        "log": result.stdout + result.stderr,
        "steps": {h["step"]: h for h in history if "loss" in h},
        "weights": load_file(output_dir / "model.safetensors"),
    }


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args, world_size=2, env=None, timeout=120):
    """Start each rank by hand, as a cluster scheduler does. Unlike torchrun, nothing stops the other ranks when
    one fails: a rank that did not raise would wait in a collective until the timeout fails the test."""
    common = {**os.environ, **ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), **(env or {})}
    procs = [
        subprocess.Popen([sys.executable, "run_magi_clm.py", *args], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in range(world_size)
    ]
    try:
        return [(proc.communicate(timeout=timeout)[0], proc.returncode) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


def magi_installed():
    try:
        import magi_attention.api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    train_file, _, tokenizer = embedded_default.prepare_default_corpus()
    (tmp / "small.txt").write_text(Path(train_file).read_text()[:20000])
    (tmp / "empty.txt").write_text("")
    (tmp / "tiny.txt").write_text("Too short.\n")
    return tmp, tokenizer


# (case, arguments that replace or add to the good ones, environment, the last line of every rank's output).
# {tmp} is the data folder. The README's table "When something is wrong" lists the same cases.
BAD_INPUTS = [
    ("cp_size does not divide the processes", ["--cp_size", "3"], {},
     "ValueError: --cp_size 3 does not divide the 2 processes: launch a multiple of cp_size processes or change "
     "--cp_size."),
    ("cp_size below 1", ["--cp_size", "0"], {},
     "ValueError: --cp_size must be at least 1, got 0: pass --cp_size 1 (no CP) or more."),
    ("block_size 0", ["--block_size", "0"], {},
     "ValueError: --block_size must be positive, got 0: pass a positive --block_size or leave it unset."),
    ("block_size above the model's positions", ["--block_size", "4096"], {},
     "ValueError: --block_size 4096 is larger than the model's max_position_embeddings (2048): pass a smaller "
     "--block_size, or raise max_position_embeddings with --config_overrides."),
    ("head counts", ["--config_overrides", "num_key_value_heads=3"], {},
     "ValueError: num_attention_heads (4) is not a multiple of num_key_value_heads (3): grouped-query attention "
     "cannot split the heads. Fix the model config (--config_overrides)."),
    ("streaming with CP", ["--streaming"], {},
     "ValueError: --streaming is not supported with --cp_size > 1: drop --streaming (map-style datasets only)."),
    ("real MagiAttention forced but absent", [], {"MAGI_ATTENTION_BACKEND": "magi"},
     "ImportError: MAGI_ATTENTION_BACKEND=magi but magi_attention.api is not importable (PyPI's magi-attention "
     "0.0.1 is an empty placeholder). Build MagiAttention from source on a Hopper GPU (git clone --recursive "
     "https://github.com/SandAI-org/MagiAttention && pip install --no-build-isolation .), or unset "
     "MAGI_ATTENTION_BACKEND to use magi_portable."),
    ("model without the attention registry",  # BLOOM, in transformers 4.51 and 5 (GPT-2 takes it in 5)
     ["--model_type", "bloom", "--config_overrides", "hidden_size=32,n_layer=1,n_head=2"], {},
     "ValueError: BloomForCausalLM cannot take the registered attention function 'Magi_Attention': it does not "
     "call attention through transformers' ALL_ATTENTION_FUNCTIONS. Use a model that does (Llama, Mistral, "
     "Qwen2, ...) or run run_origin_clm.py."),
    ("missing train file", ["--train_file", "{tmp}/missing.txt"], {},
     "ValueError: Data file {tmp}/missing.txt is missing or empty: give a text file with content."),
    ("empty train file", ["--train_file", "{tmp}/empty.txt"], {},
     "ValueError: Data file {tmp}/empty.txt is missing or empty: give a text file with content."),
    ("text shorter than a block", ["--train_file", "{tmp}/tiny.txt", "--validation_file", "{tmp}/tiny.txt"], {},
     "ValueError: The train text is shorter than one block of 64 tokens: give more text or a smaller --block_size."),
]


@pytest.mark.parametrize("extra, env, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_stops_every_rank_before_training_with_one_line(data, tmp_path, extra, env, message):
    if env.get("MAGI_ATTENTION_BACKEND") == "magi" and magi_installed():
        pytest.skip("the real MagiAttention is installed here")
    tmp, tokenizer = data
    good = ["--cp_size", "2", "--tokenizer_name", tokenizer, "--train_file", f"{tmp}/small.txt",
            "--validation_file", f"{tmp}/small.txt", "--block_size", "64", "--output_dir", str(tmp_path / "out"),
            "--do_train", "--use_cpu", "--ddp_backend", "gloo", "--report_to", "none"]
    # The last occurrence of an argument wins.
    results = run_ranks(good + [a.format(tmp=tmp) for a in extra], env=env)
    for rank, (output, returncode) in enumerate(results):
        assert returncode == 1, output[-3000:]
        # torch prefixes the lines of a rank once its process group is up.
        last_line = output.strip().splitlines()[-1].removeprefix(f"[rank{rank}]: ")
        assert last_line == message.format(tmp=tmp), output[-3000:]
        assert "Running training" not in output


SUPPORTED_STACKS_LINE = (
    "the context-parallel overrides are written for transformers>=4.51.0,<4.52.0 with accelerate>=1.6.0,<1.10.0 "
    "(pip install -r requirements.txt) or transformers>=5.17.0,<5.24.0 with accelerate>=1.15.0,<1.16.0 "
    "(pip install -r requirements-current.txt)."
)


def installed_versions(monkeypatch, transformers_version, accelerate_version):
    """Stand in for the installed versions where require_version reads them."""
    real_version = importlib.metadata.version
    fake = {"transformers": transformers_version, "accelerate": accelerate_version}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or real_version(name))


@pytest.mark.parametrize("transformers_version, accelerate_version", [
    ("4.51.3", "1.6.0"), ("4.51.0", "1.9.0"), ("5.17.0", "1.15.0"), ("5.23.0", "1.15.0"), ("5.23.1", "1.15.2"),
])
def test_supported_versions_are_taken(monkeypatch, transformers_version, accelerate_version):
    installed_versions(monkeypatch, transformers_version, accelerate_version)
    magi_utils.check_supported_versions()


@pytest.mark.parametrize("transformers_version, accelerate_version", [
    ("4.52.0", "1.6.0"), ("4.51.3", "1.10.0"), ("4.51.3", "1.15.0"), ("5.16.0", "1.15.0"), ("5.24.0", "1.15.0"),
    ("5.23.0", "1.14.0"), ("5.23.0", "1.6.0"),
])
def test_unsupported_version_is_refused_first(monkeypatch, tmp_path, transformers_version, accelerate_version):
    installed_versions(monkeypatch, transformers_version, accelerate_version)
    monkeypatch.setattr(sys, "argv", ["run_magi_clm.py", "--output_dir", str(tmp_path), "--use_cpu"])
    with pytest.raises(RuntimeError) as error:
        run_magi_clm.main()
    assert str(error.value) == (
        f"transformers {transformers_version} with accelerate {accelerate_version} is not supported: "
        + SUPPORTED_STACKS_LINE
    )


def test_running_without_torchrun_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "run_magi_clm.py", "--output_dir", str(tmp_path), "--use_cpu"],
                            cwd=REPO, env={**env, **ENV}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "ValueError: run_magi_clm.py runs under torchrun, even for one process: use run_magi_clm.sh."


@pytest.mark.parametrize("cp_size, nproc, message", [
    ("3", "2", "CP_SIZE=3 does not divide the 2 processes: change CP_SIZE or NPROC"),
    ("0", "", "CP_SIZE=0 is not a positive number of ranks: set CP_SIZE to 1 (no CP), 2, 4 or 8"),
    ("two", "", "CP_SIZE=two is not a positive number of ranks: set CP_SIZE to 1 (no CP), 2, 4 or 8"),
])
def test_launcher_refuses_a_bad_cp_size_before_starting(tmp_path, cp_size, nproc, message):
    env = {"CP_SIZE": cp_size, **({"NPROC": nproc} if nproc else {})}
    result = launch("run_magi_clm.sh", tmp_path / "out", env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == message
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    """A CP 2 run that saves a checkpoint half way."""
    out = tmp_path_factory.mktemp("cp") / "run"
    return out, train("run_magi_clm.sh", out)


def test_padded_sequence_length_trains(cp_run):
    tokens = 8 * BLOCK_SIZE  # the launcher's 8 samples a step, one CP group
    assert magi_portable.compute_pad_size(tokens, 2, magi_portable.default_chunk_size(tokens, 2)) > 0
    _, run = cp_run
    losses = [run["steps"][s]["loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0] - 0.5


def test_cp_run_is_deterministic(cp_run, tmp_path):
    _, first = cp_run
    second = train("run_magi_clm.sh", tmp_path / "again")
    assert second["steps"] == first["steps"]  # loss, grad norm and learning rate of every step
    assert_same_weights(second["weights"], first["weights"])


def test_baseline_is_deterministic(tmp_path):
    first = train("run_origin_clm.sh", tmp_path / "first")
    second = train("run_origin_clm.sh", tmp_path / "second")
    assert sorted(first["steps"]) == list(range(1, STEPS + 1))
    assert second["steps"] == first["steps"]
    assert_same_weights(second["weights"], first["weights"])


def test_interrupted_cp_run_resumes_exactly(cp_run, tmp_path):
    out, full = cp_run
    checkpoint = out / f"checkpoint-{SAVE_STEPS}"
    resumed = train("run_magi_clm.sh", tmp_path / "resumed", "--resume_from_checkpoint", str(checkpoint))
    # transformers 4.51's wording, then transformers 5's.
    assert re.search(rf"(Continuing training from|Resuming training from checkpoint with epoch \d+ and) global step "
                     rf"{SAVE_STEPS}\b", resumed["log"])
    # Steps 1-5 come from the checkpoint; 6-10 were trained again, on the same batches at the same learning rates.
    assert resumed["steps"] == full["steps"]
    assert [resumed["steps"][s]["learning_rate"] for s in range(SAVE_STEPS + 1, STEPS + 1)] == \
        [full["steps"][s]["learning_rate"] for s in range(SAVE_STEPS + 1, STEPS + 1)]
    assert_same_weights(resumed["weights"], full["weights"])


def test_one_failing_rank_stops_the_job(cp_run, tmp_path):
    # A checkpoint copied incompletely: only rank 1's random state is cut short, so only rank 1 fails, after
    # rank 0 has gone on into the first training step's collectives.
    out, _ = cp_run
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(out / f"checkpoint-{SAVE_STEPS}", checkpoint)
    rng_state = checkpoint / "rng_state_1.pth"
    rng_state.write_bytes(rng_state.read_bytes()[:500])

    start = time.monotonic()
    result = launch("run_magi_clm.sh", tmp_path / "out", *RUN_ARGS, "--resume_from_checkpoint", str(checkpoint),
                    timeout=300)
    assert time.monotonic() - start < 120
    assert result.returncode == 1
    # Rank 1's traceback is in the output, down to the error.
    rank1 = [line for line in result.stderr.splitlines() if line.startswith("[rank1]: ")]
    assert any("_load_rng_state" in line for line in rank1), result.stderr[-3000:]
    assert re.match(r"\[rank1\]: \w+Error: ", rank1[-1]), rank1[-1]
