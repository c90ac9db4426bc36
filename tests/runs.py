"""Real runs for the tests: the launchers, ranks started by hand, and a script's main in this process."""

import json
import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from run_guards import UserError, release_output_dir

REPO = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS, SAVE_STEPS, BLOCK_SIZE = 10, 5, 255
# Warm up over 2 steps so that the cosine decay is resumed too.
RUN_ARGS = ["--block_size", str(BLOCK_SIZE), "--warmup_steps", "2", "--save_steps", str(SAVE_STEPS),
            "--max_eval_samples", "8"]


def launch(script, output_dir, *args, env=None, cwd=REPO, timeout=300):
    """A launcher run of STEPS steps (MAX_STEPS), from the folder cwd."""
    env = {**os.environ, **ENV, "OUTPUT_DIR": str(output_dir), "MAX_STEPS": str(STEPS), **(env or {})}
    return subprocess.run(["bash", str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train(script, output_dir, *args, env=None, cwd=REPO):
    """A launcher run with RUN_ARGS: its log, the logged entry of every step, the final weights and results."""
    result = launch(script, output_dir, *RUN_ARGS, *args, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output_dir = Path(cwd) / output_dir
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {
        "log": result.stdout + result.stderr,
        "steps": {h["step"]: h for h in history if "loss" in h},
        "weights": load_file(output_dir / "model.safetensors"),
        "results": json.loads((output_dir / "all_results.json").read_text()),
    }


# A PYTHON for the launchers that runs nothing: it answers their torch check with no GPUs and prints the command
# they start their script with.
PYTHON_STUB = """#!/bin/bash
if [ "$1" = -c ]; then echo 0; else printf '%s\\0' "$@"; fi
"""


def launcher_arguments(script, output_dir, *args, env=None, tmp_path):
    """The arguments that a launcher run with RUN_ARGS and args would hand its script, read without starting it: for
    checks that run_origin_main makes of the same command in this process (without --ddp_backend gloo, which there
    would look for a process group)."""
    stub = tmp_path / "python_stub"
    stub.write_text(PYTHON_STUB)
    stub.chmod(0o755)
    result = launch(script, output_dir, *RUN_ARGS, *args, env={"PYTHON": str(stub), **(env or {})})
    assert result.returncode == 0, result.stderr
    command = result.stdout.split("\0")[:-1]
    arguments = command[[Path(word).name for word in command].index(script.replace(".sh", ".py")) + 1:]
    backend = arguments.index("--ddp_backend")
    return arguments[:backend] + arguments[backend + 2:]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def fake_checkpoint(path, step, max_steps, leave_out=()):
    """The files of a Trainer's checkpoint, small."""
    path.mkdir(parents=True)
    writers = {
        "trainer_state.json": lambda p: p.write_text(json.dumps(
            {"global_step": step, "max_steps": max_steps, "log_history": []})),
        "model.safetensors": lambda p: save_file({"weight": torch.zeros(1)}, p),
        "optimizer.pt": lambda p: torch.save({}, p),
        "scheduler.pt": lambda p: torch.save({}, p),
        "rng_state_0.pth": lambda p: torch.save({}, p),
        "rng_state_1.pth": lambda p: torch.save({}, p),
    }
    for name, write in writers.items():
        if name not in leave_out:
            write(path / name)


def error_lines(result):
    """The lines of a run's output that report an error: one, for a bad input."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if re.search(r"error:|Error\b|Traceback", line, re.IGNORECASE)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args, world_size=2, env=None, timeout=120):
    """Start each rank of run_magi_clm.py by hand, as a cluster scheduler does: unlike torchrun, nothing stops the
    other ranks when one ends."""
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


def run_origin_main(monkeypatch, *args, env=None):
    """run_origin_clm.py's main in this process, one CPU process: for checks that the two scripts share (the CP
    diff does not touch them), without the seconds of starting processes."""
    import run_origin_clm

    run_main_here(run_origin_clm, monkeypatch, args, env)


def run_magi_main(monkeypatch, *args, env=None):
    """run_magi_clm.py's main in this process, as the one process of a job (RANK 0): for its own checks before the
    process group starts."""
    import run_magi_clm

    run_main_here(run_magi_clm, monkeypatch, args, {"RANK": "0", **(env or {})})


def run_main_here(script, monkeypatch, args, env):
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *args, "--use_cpu", "--report_to", "none"])
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GLOBAL_BATCH", raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    # TrainingArguments writes accelerate's settings into the environment (ACCELERATE_USE_FSDP, ...), which the runs
    # that later tests start would inherit.
    monkeypatch.setattr(os, "environ", os.environ.copy())
    try:
        script.main()
    except UserError:
        release_output_dir()  # as run_guards.run_main does
        raise


@contextmanager
def small_disk(path, size, options=""):
    """A file system of `size` (tmpfs, with more mount options if given: "ro") mounted at path, for as long as the
    block runs; the test is skipped where this machine does not let mount it (it needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(filter(None, [f"size={size}", options])), "tmpfs",
                            str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)
