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
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import embedded_default
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


def train(script, output_dir, *args, env=None):
    """A launcher run of STEPS steps: its log, the logged entry of every step, and the final weights."""
    result = launch(script, output_dir, *RUN_ARGS, *args, env=env)
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
    small_text = Path(train_file).read_text()[:20000]
    (tmp / "small.txt").write_text(small_text)
    (tmp / "empty.txt").write_text("")
    (tmp / "tiny.txt").write_text("Too short.\n")
    AutoTokenizer.from_pretrained(tokenizer, eos_token=None).save_pretrained(tmp / "tokenizer_without_eos")
    (tmp / "utf16.txt").write_text(small_text, encoding="utf-16")
    # An earlier run's output folder, and one that a live process (this one) holds.
    for step in (30, 35):
        (tmp / "earlier" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp / "busy").mkdir()
    (tmp / "busy" / "run.lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    # A checkpoint whose random state was copied incompletely.
    (tmp / "damaged").mkdir()
    torch.save({"python": None}, tmp / "damaged" / "rng_state_1.pth")
    rng_state = tmp / "damaged" / "rng_state_1.pth"
    rng_state.write_bytes(rng_state.read_bytes()[:200])
    return tmp, tokenizer


# (case, arguments that replace or add to the good ones, environment, the last line of every rank's output).
# {tmp} is the data folder, {host} and {pid} those of this process. The README's table "When something is wrong"
# lists the same cases.
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
    ("document masking with a tokenizer without end-of-text token",
     ["--document_masking", "--tokenizer_name", "{tmp}/tokenizer_without_eos"], {},
     "ValueError: --document_masking ends every document with the tokenizer's end-of-text token, and this "
     "PreTrainedTokenizerFast has none: use a tokenizer with an eos_token, or drop --document_masking."),
    ("UTF-16 train file", ["--train_file", "{tmp}/utf16.txt"], {},
     "ValueError: Data file {tmp}/utf16.txt is not UTF-8 text (invalid start byte): convert it to UTF-8 (e.g. with "
     "iconv)."),
    ("output folder of an earlier run", ["--output_dir", "{tmp}/earlier"], {},
     "ValueError: Output folder {tmp}/earlier holds an earlier run (checkpoint-30, checkpoint-35): resume it with "
     "--resume_from_checkpoint {tmp}/earlier/checkpoint-35, give another --output_dir (OUTPUT_DIR for the "
     "launchers), or delete the folder."),
    ("output folder in use", ["--output_dir", "{tmp}/busy"], {},
     "ValueError: Output folder {tmp}/busy is in use by a run in progress (process {pid} on {host}): wait for it to "
     "end or give another --output_dir; if no run is using it, delete {tmp}/busy/run.lock."),
    ("damaged checkpoint", ["--resume_from_checkpoint", "{tmp}/damaged"], {},
     "ValueError: Checkpoint file {tmp}/damaged/rng_state_1.pth is damaged (File is not a zip file): resume from "
     "another checkpoint, or copy it again."),
]


def assert_every_rank_ends_on(results, message):
    for rank, (output, returncode) in enumerate(results):
        assert returncode == 1, output[-3000:]
        # torch prefixes the lines of a rank once its process group is up.
        last_line = output.strip().splitlines()[-1].removeprefix(f"[rank{rank}]: ")
        assert last_line == message, output[-3000:]
        assert "Running training" not in output


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
    assert_every_rank_ends_on(results, message.format(tmp=tmp, host=socket.gethostname(), pid=os.getpid()))


def test_validation_file_without_train_file_is_refused(data, tmp_path):
    # Not a row of BAD_INPUTS, whose good arguments give --train_file.
    tmp, tokenizer = data
    results = run_ranks(["--cp_size", "2", "--tokenizer_name", tokenizer, "--validation_file", f"{tmp}/small.txt",
                         "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--use_cpu",
                         "--ddp_backend", "gloo", "--report_to", "none"])
    assert_every_rank_ends_on(results, "ValueError: --validation_file was given without --train_file: give "
                              "--train_file too, or neither to train on the embedded default.")


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


@pytest.mark.parametrize("script, args, message", [
    ("run_magi_clm.sh", ["--per_device_train_batch_size", "3"], "--per_device_train_batch_size is set by "
     "run_magi_clm.sh to keep the global batch at GLOBAL_BATCH: set PER_DEVICE_BATCH instead"),
    ("run_magi_clm.sh", ["--cp_size=1"],
     "--cp_size is set by run_magi_clm.sh to keep the global batch at GLOBAL_BATCH: set CP_SIZE instead"),
    ("run_origin_clm.sh", ["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps is set by "
     "run_origin_clm.sh to keep the global batch at GLOBAL_BATCH: set GLOBAL_BATCH instead"),
])
def test_launcher_refuses_arguments_that_change_the_global_batch(tmp_path, script, args, message):
    result = launch(script, tmp_path / "out", *args, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == message
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has GPUs")
@pytest.mark.parametrize("script", ["run_magi_clm.sh", "run_origin_clm.sh"])
def test_full_recipe_is_refused_at_once_without_gpus(tmp_path, script):
    start = time.monotonic()
    result = launch(script, tmp_path / "out", env={"RECIPE": "full"}, timeout=60)
    assert time.monotonic() - start < 30  # not the data loader's retries
    assert result.returncode == 1
    assert result.stderr.strip() == \
        "RECIPE=full needs GPUs and this machine has none (torch sees no CUDA device): use RECIPE=default here"


def test_help_lists_cp_size_first():
    out = subprocess.run([sys.executable, "run_magi_clm.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **ENV}, check=True).stdout
    options = out[out.index("\noptions:"):].split("\n  -")[1:]
    assert options[0].startswith("h, --help")
    assert options[1].startswith("-cp_size CP_SIZE")


# Imported by every process of a run through PYTHONPATH: an exit handler registered before any other runs after
# all of them, when only the interpreter's shutdown is left.
EXIT_PROBE = """
import atexit, os

def count_gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    # One write of one short line: the ranks share the pipe, and a line written in pieces can interleave.
    count = sum("gloo" in n for n in names)
    os.write(1, f"rank {os.environ.get('RANK', 'none')}: gloo threads at exit: {count}\\n".encode())

atexit.register(count_gloo_threads)
"""


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    """A CP 2 run that saves a checkpoint half way, with EXIT_PROBE in each process."""
    probe = tmp_path_factory.mktemp("probe")
    (probe / "sitecustomize.py").write_text(EXIT_PROBE)
    out = tmp_path_factory.mktemp("cp") / "run"
    return out, train("run_magi_clm.sh", out, env={"PYTHONPATH": str(probe)})


def test_no_gloo_thread_outlives_a_finished_run(cp_run):
    # gloo threads left to the interpreter's shutdown can abort a finished run (SIGABRT, "terminate called without
    # an active exception"): every rank has joined them before it exits.
    _, run = cp_run
    counts = dict(re.findall(r"rank (\w+): gloo threads at exit: (\d+)", run["log"]))
    assert counts["0"] == counts["1"] == "0", counts


def test_padded_sequence_length_trains(cp_run):
    _, run = cp_run
    # The plan the run logged: its tokens do not fill the CP group's chunks, so they were padded.
    samples, seq_len, chunk_size, cp_size = map(int, re.search(
        r"CP plan for (\d+) samples x (\d+) tokens, \d+ causal sequences: chunks of (\d+) tokens over (\d+) ranks", run["log"]).groups())
    assert (samples, seq_len, cp_size) == (8, BLOCK_SIZE, 2)
    assert samples * seq_len % (chunk_size * cp_size) != 0
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
    # The folder of a run killed after its checkpoint at step 5: the checkpoint and the dead run's lock.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(out / f"checkpoint-{SAVE_STEPS}", interrupted / f"checkpoint-{SAVE_STEPS}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (interrupted / "run.lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    resumed = train("run_magi_clm.sh", interrupted, "--resume_from_checkpoint",
                    str(interrupted / f"checkpoint-{SAVE_STEPS}"))
    assert f"Resuming the run in {interrupted} from {interrupted / f'checkpoint-{SAVE_STEPS}'}." in resumed["log"]
    # transformers 4.51's wording, then transformers 5's.
    assert re.search(rf"(Continuing training from|Resuming training from checkpoint with epoch \d+ and) global step "
                     rf"{SAVE_STEPS}\b", resumed["log"])
    # Steps 1-5 come from the checkpoint; 6-10 were trained again, on the same batches at the same learning rates
    # (the entries hold the loss, gradient norm and learning rate).
    assert resumed["steps"] == full["steps"]
    assert_same_weights(resumed["weights"], full["weights"])
    assert not (interrupted / "run.lock").exists()


def test_a_finished_runs_folder_is_not_reused(cp_run):
    # Appending arguments to the launcher, as the README suggests, would write into the same folder.
    out, _ = cp_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = launch("run_magi_clm.sh", out, "--learning_rate", "1e-3", timeout=120)
    assert result.returncode == 1
    assert f"ValueError: Output folder {out} holds an earlier run (README.md, all_results.json, checkpoint-10, " \
        f"...): resume it with --resume_from_checkpoint {out}/checkpoint-10, give another --output_dir " \
        "(OUTPUT_DIR for the launchers), or delete the folder." in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_own_text_trains_with_the_default_tokenizer(data, tmp_path):
    # The README's own-data command: no model and no tokenizer given.
    tmp, tokenizer = data
    run = train("run_magi_clm.sh", tmp_path / "own", "--train_file", f"{tmp}/small.txt",
                "--validation_file", f"{tmp}/small.txt")
    assert f"No model or tokenizer given: using the embedded default's tokenizer, {tokenizer}." in run["log"]
    assert "No dataset given" not in run["log"]
    assert "Num examples = 24" in run["log"]  # the blocks of small.txt, not the thousands of the default corpus


def test_one_failing_rank_stops_the_job(cp_run, tmp_path):
    # A checkpoint whose rank-1 random state is a whole file of the wrong content (a damaged file is named before
    # any work, on every rank: see BAD_INPUTS): only rank 1 fails, after rank 0 has gone on into the first
    # training step's collectives.
    out, _ = cp_run
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(out / f"checkpoint-{SAVE_STEPS}", checkpoint)
    torch.save("not a random state", checkpoint / "rng_state_1.pth")

    start = time.monotonic()
    result = launch("run_magi_clm.sh", tmp_path / "out", *RUN_ARGS, "--resume_from_checkpoint", str(checkpoint),
                    timeout=300)
    assert time.monotonic() - start < 120
    assert result.returncode == 1
    # Rank 1's traceback is in the output, down to the error.
    rank1 = [line for line in result.stderr.splitlines() if line.startswith("[rank1]: ")]
    assert any("_load_rng_state" in line for line in rank1), result.stderr[-3000:]
    assert re.match(r"\[rank1\]: \w+Error: ", rank1[-1]), rank1[-1]
