"""The launchers: settings they refuse before starting anything, the global batch they keep whatever the spelling of
an argument, one line for a bad input and for a full disk, paths taken from the folder they are run from, and ranks
that stop when the launcher is killed."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import embedded_default
from bad_inputs import LAUNCHER_BAD_SETTINGS
from runs import ENV, REPO, RUN_ARGS, error_lines, launch, small_disk, train

SCRIPTS = ["run_magi_clm.sh", "run_origin_clm.sh"]


@pytest.mark.parametrize("script, env, message", [c[1:] for c in LAUNCHER_BAD_SETTINGS],
                         ids=[f"{c[0]} ({c[1]})" for c in LAUNCHER_BAD_SETTINGS])
def test_launcher_refuses_bad_settings_before_starting(tmp_path, script, env, message):
    result = launch(script, tmp_path / "out", env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has GPUs")
@pytest.mark.parametrize("script", SCRIPTS)
def test_full_recipe_is_refused_at_once_without_gpus(tmp_path, script):
    start = time.monotonic()
    result = launch(script, tmp_path / "out", env={"RECIPE": "full"}, timeout=60)
    assert time.monotonic() - start < 30  # not the data loader's retries
    assert result.returncode == 1
    assert result.stderr.strip() == \
        "RECIPE=full needs GPUs and this machine has none (torch sees no CUDA device): use RECIPE=default here"


def test_an_argument_that_changes_the_global_batch_ends_the_job_with_one_line(tmp_path):
    # The dash spelling that HfArgumentParser takes: the scripts check the global batch they parsed.
    result = launch("run_magi_clm.sh", tmp_path / "out", "--cp-size", "1", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert error_lines(result) == [
        "run_magi_clm.py: error: The arguments make a global batch of 16 samples a step (per_device_train_batch_size "
        "8 x gradient_accumulation_steps 1 x 2 data-parallel replicas), not GLOBAL_BATCH=8: set GLOBAL_BATCH, "
        "PER_DEVICE_BATCH or CP_SIZE for the launchers instead of --per_device_train_batch_size, "
        "--gradient_accumulation_steps or --cp_size."
    ], output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output
    assert not (tmp_path / "out").exists()


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # not ended, nor a zombie
    except FileNotFoundError:
        return False


def test_the_ranks_stop_when_the_launcher_is_killed(tmp_path):
    # kill -9 of torchrun's agent: it cannot stop the ranks, which run in sessions of their own.
    log = tmp_path / "log"
    train_file, _, _ = embedded_default.prepare_default_corpus()
    (tmp_path / "small.txt").write_text(Path(train_file).read_text()[:20000])
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            ["bash", str(REPO / "run_magi_clm.sh"), "--train_file", "small.txt", "--validation_file", "small.txt",
             "--block_size", "64", "--save_steps", "1000"], cwd=tmp_path,
            env={**os.environ, **ENV, "OUTPUT_DIR": "out", "MAX_STEPS": "1000"}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "'loss'" not in log.read_text():  # a step has been trained
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        agent = int(subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout)
        ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(agent)], capture_output=True,
                                                     text=True).stdout.split()]
        assert len(ranks) == 2
        os.kill(agent, signal.SIGKILL)
        assert launcher.wait(timeout=30) == 128 + signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ranks):
            assert time.monotonic() < deadline, "a rank goes on without its launcher"
            time.sleep(0.2)
        assert "its launcher (process" in log.read_text()
        assert not (tmp_path / "out" / "all_results.json").exists()
    finally:
        launcher.kill()


def test_own_text_trains_with_the_default_tokenizer_from_another_folder(tmp_path):
    # The README's own-data command (with either launcher: they take paths alike), run from the user's folder with
    # paths relative to it: no model and no tokenizer given.
    train_file, _, tokenizer = embedded_default.prepare_default_corpus()
    (tmp_path / "small.txt").write_text(open(train_file).read()[:20000])
    run = train("run_origin_clm.sh", "own", "--train_file", "small.txt", "--validation_file", "small.txt",
                cwd=tmp_path, env={"MAX_STEPS": "2"})
    assert f"Starting a new run in {tmp_path}/own." in run["log"]
    assert f"No model or tokenizer given: using the embedded default's tokenizer, {tokenizer}." in run["log"]
    assert "No dataset given" not in run["log"]
    assert "Num examples = 24" in run["log"]  # the blocks of small.txt, not the thousands of the default corpus


def test_a_full_disk_while_saving_is_said_once(tmp_path):
    # Room for the checkpoint at step 5 (22 MB) and not for the one at step 10.
    with small_disk(tmp_path / "disk", "30m") as disk:
        result = launch("run_magi_clm.sh", disk / "run", *RUN_ARGS)
        assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
        [line] = error_lines(result)
        assert re.fullmatch(
            rf"run_magi_clm\.py: error: The disk of {disk}/run is full \(\d+ bytes free\) while writing checkpoint-10: "
            rf"the last complete checkpoint is {disk}/run/checkpoint-5: make room, then resume from it "
            r"\(--resume_from_checkpoint\)\.", line), line
        assert "Traceback" not in result.stdout + result.stderr
