"""Runs, checkpoints and resumes: the launchers' default CP run trains like the baseline run; both resume exactly, bit
for bit (which shows them deterministic too), and the summary holds the whole run's train loss; a finished run, a
resume past the end or with other settings, and an incomplete checkpoint are refused with what to do instead; one
failing rank ends the job with the reason; no gloo thread outlives a finished run. Real CPU runs through the
launchers: one reference CP run serves most checks, and the refusals, which both scripts share, are checked on the
same command in this process."""

import re
import shutil
import socket
import subprocess
import time

import pytest
import torch

import embedded_default
from run_guards import UserError
from runs import (
    BLOCK_SIZE,
    RUN_ARGS,
    SAVE_STEPS,
    STEPS,
    assert_same_weights,
    launch,
    launcher_arguments,
    run_origin_main,
    train,
)

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


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """The same run without CP: run_origin_clm.sh."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    return out, train("run_origin_clm.sh", out)


def test_cp_run_trains_like_the_baseline(cp_run, baseline_run):
    # The launchers' default CP 2 against the baseline, to tests/test_cp_exactness.py's tolerances.
    (_, cp), (_, baseline) = cp_run, baseline_run
    assert cp["steps"].keys() == baseline["steps"].keys() == set(range(1, STEPS + 1))
    for step, entry in baseline["steps"].items():
        assert abs(cp["steps"][step]["loss"] - entry["loss"]) <= 1e-4, step
    for name, reference in baseline["weights"].items():
        assert (cp["weights"][name] - reference).norm() / reference.norm() <= 1e-4, name
    assert abs(cp["results"]["eval_loss"] - baseline["results"]["eval_loss"]) <= 1e-4


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
        r"CP plan for (\d+) samples x (\d+) tokens, \d+ causal sequences: chunks of (\d+) tokens over (\d+) ranks",
        run["log"]).groups())
    assert (samples, seq_len, cp_size) == (8, BLOCK_SIZE, 2)
    assert samples * seq_len % (chunk_size * cp_size) != 0
    losses = [run["steps"][s]["loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0] - 0.5


def test_the_log_gives_true_figures_and_the_plan_once(cp_run):
    _, run = cp_run
    # The global batch: 8 samples a step over the CP group of 2 ranks (transformers 4.51 would log 16).
    figures = re.findall(r"Total train batch size \(w\. parallel, distributed & accumulation\) = (\d+)", run["log"])
    assert figures and set(figures) == {"8"}, figures
    assert "Global batch: 8 samples a step" in run["log"]
    # Each rank by its rank (transformers 5's local_rank is -1); one plan for the one shape of batch.
    assert {int(rank) for rank in re.findall(r"Process rank: (-?\d+)", run["log"])} == {0, 1}
    assert len(re.findall("CP plan for", run["log"])) == 1


def test_baseline_run_trains_evaluates_and_resumes_exactly(baseline_run, tmp_path):
    out, full = baseline_run
    losses = [full["steps"][s]["loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0] - 0.5
    assert {"train_loss", "eval_loss", "perplexity", "eval_accuracy"} <= full["results"].keys()
    assert 0.0 < full["results"]["eval_accuracy"] < 1.0
    # Resumed in another folder from the checkpoint at step 5: steps 6-10 trained again in other processes give the
    # same entries and weights, bit for bit.
    resumed = train("run_origin_clm.sh", tmp_path / "resumed", "--resume_from_checkpoint",
                    str(out / f"checkpoint-{SAVE_STEPS}"))
    assert resumed["steps"] == full["steps"]
    assert_same_weights(resumed["weights"], full["weights"])


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
    assert "Training new model from scratch" not in resumed["log"]
    # Steps 1-5 come from the checkpoint; 6-10 were trained again, on the same batches at the same learning rates
    # (the entries hold the loss, gradient norm and learning rate).
    assert resumed["steps"] == full["steps"]
    assert_same_weights(resumed["weights"], full["weights"])
    # The summary's train loss is the whole run's (from the log, whose losses have 4 decimals on transformers 4.51).
    assert resumed["results"]["train_loss"] == pytest.approx(full["results"]["train_loss"], abs=1e-4)
    assert not (interrupted / "run.lock").exists()


def test_a_finished_runs_folder_is_not_reused(cp_run, tmp_path, monkeypatch):
    # Appending arguments to the launcher, as the README suggests, would write into the same folder.
    out, _ = cp_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, *launcher_arguments("run_origin_clm.sh", out, "--learning_rate", "1e-3",
                                                         tmp_path=tmp_path))
    assert str(error.value) == (
        f"Output folder {out} holds an earlier run (all_results.json, checkpoint-10, checkpoint-5, ...): it is "
        f"finished (step 10 of 10): to train it further, resume from {out}/checkpoint-10 with a larger --max_steps "
        "(MAX_STEPS for the launchers), or give another --output_dir (OUTPUT_DIR for the launchers), or delete the "
        "folder.")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize("checkpoint, max_steps, message", [
    # The finished run, as its folder's refusal would have had it before: the Trainer would train a step 11.
    (STEPS, STEPS, "Checkpoint {checkpoint} ends a finished run (step 10 of 10): there is nothing left to train. To "
     "train it further, resume with a larger --max_steps (MAX_STEPS for the launchers); to train anew, give another "
     "--output_dir."),
    (SAVE_STEPS, 4, "Checkpoint {checkpoint} is at step 5, and this run ends at step 4: give a --max_steps "
     "(MAX_STEPS for the launchers) above 5 to train on from it."),
], ids=["finished", "fewer steps"])
def test_a_resume_with_no_step_left_is_refused(cp_run, tmp_path, monkeypatch, checkpoint, max_steps, message):
    out, _ = cp_run
    checkpoint = out / f"checkpoint-{checkpoint}"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, *launcher_arguments(
            "run_origin_clm.sh", out, "--resume_from_checkpoint", str(checkpoint), env={"MAX_STEPS": str(max_steps)},
            tmp_path=tmp_path))
    assert str(error.value) == message.format(checkpoint=checkpoint)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # the lock taken is let go of


def test_a_resume_that_changes_what_a_step_computes_is_refused(cp_run, tmp_path, monkeypatch):
    out, _ = cp_run
    checkpoint = out / f"checkpoint-{SAVE_STEPS}"
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, *launcher_arguments(
            "run_origin_clm.sh", tmp_path / "out", "--resume_from_checkpoint", str(checkpoint), "--document_masking",
            "--block_size", "128", tmp_path=tmp_path))
    assert str(error.value) == (
        f"Checkpoint {checkpoint} was trained with other settings: block_size {BLOCK_SIZE} there, 128 here; "
        "document_masking False there, True here. A resume goes on with the same run: give its settings, or start a "
        f"new run from the checkpoint's weights (--model_name_or_path {checkpoint}) in another --output_dir.")


def test_an_incomplete_checkpoint_is_named_and_never_advised(cp_run, tmp_path, monkeypatch):
    # A run killed while saving checkpoint-10: its trainer_state.json is not written.
    out, _ = cp_run
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    (killed / "checkpoint-10" / "trainer_state.json").unlink()
    _, _, tokenizer = embedded_default.prepare_default_corpus()
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, "--tokenizer_name", tokenizer, "--output_dir", str(killed), "--do_train")
    assert str(error.value) == (
        f"Output folder {killed} holds an earlier run (all_results.json, checkpoint-10, checkpoint-5, ...), whose "
        f"checkpoint-10 is incomplete: resume it with --resume_from_checkpoint {killed}/checkpoint-5, give another "
        "--output_dir (OUTPUT_DIR for the launchers), or delete the folder.")
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, "--tokenizer_name", tokenizer, "--output_dir", str(killed), "--do_train",
                        "--resume_from_checkpoint", str(killed / "checkpoint-10"))
    assert str(error.value) == (
        f"Checkpoint {killed}/checkpoint-10 is incomplete (no trainer_state.json), so it cannot resume its run "
        f"exactly: resume from {killed}/checkpoint-5, the last complete checkpoint, or start a new run from its "
        f"weights (--model_name_or_path {killed}/checkpoint-10) in another --output_dir.")


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
