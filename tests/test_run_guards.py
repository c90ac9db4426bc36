"""run_guards.py on its own: the output folder's lock and what it tells apart, the checkpoints it takes as complete,
and the run's train loss after a resume. (The refusals of bad input: test_bad_inputs.py; in real runs:
test_resume.py and test_launchers.py.)"""

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from run_guards import UserError, checkpoint_gap, claim_output_dir, last_complete_checkpoint, train_loss_of_the_run
from runs import fake_checkpoint, small_disk


def claim(output_dir, resume=None):
    claim_output_dir(SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=resume, process_index=0))


@pytest.mark.parametrize("content", ["", "\0\0\0", "garbage"])
def test_an_empty_or_unreadable_lock_does_not_block_the_folder(tmp_path, content):
    # What a full disk at start left: a lock that names no run.
    (tmp_path / "run.lock").write_text(content)
    claim(tmp_path)
    host, pid = (tmp_path / "run.lock").read_text().split()
    assert host == socket.gethostname() and int(pid) > 0


def test_files_of_no_run_stay_beside_a_new_run(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / ".gitkeep").write_text("")
    caplog.set_level("INFO")
    claim(tmp_path)
    assert f"Output folder {tmp_path} holds files of no run (.gitkeep, notes.txt): the run writes beside them." \
        in caplog.text
    assert (tmp_path / "notes.txt").read_text() == "my notes"


def test_a_full_disk_at_start_is_named(tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        (disk / "filler").write_bytes(b"x" * 64 * 1024)
        with pytest.raises(UserError) as error:
            claim(disk / "out")
        assert str(error.value) == f"The disk of {disk / 'out'} is full (0 bytes free), so the run cannot start in " \
            "it: make room, or give another --output_dir."
        assert not (disk / "out" / "run.lock").exists()


def test_a_read_only_folder_at_start_is_named(tmp_path):
    with small_disk(tmp_path / "disk", "64k", "ro") as disk:
        with pytest.raises(UserError) as error:
            claim(disk)
        assert str(error.value) == f"{disk} cannot be written (Read-only file system), so the run cannot start in " \
            "it: make it writable, or give another --output_dir."


def test_a_sharded_checkpoint_is_complete(tmp_path):
    # FSDP's: the model and optimizer state in folders of .distcp files.
    checkpoint = tmp_path / "checkpoint-4"
    fake_checkpoint(checkpoint, 4, 10, leave_out=["model.safetensors", "optimizer.pt"])
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (checkpoint / folder).mkdir()
        (checkpoint / folder / "__0_0.distcp").write_bytes(b"\0")
    assert checkpoint_gap(checkpoint) is None
    shutil.rmtree(checkpoint / "optimizer_0")
    assert checkpoint_gap(checkpoint) == "no optimizer state (optimizer.pt)"


def test_the_last_complete_checkpoint_passes_over_an_incomplete_one(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-4", 4, 12)
    fake_checkpoint(tmp_path / "checkpoint-8", 8, 12, leave_out=["trainer_state.json"])  # killed while saving
    fake_checkpoint(tmp_path / "checkpoint-12", 12, 12, leave_out=["rng_state_0.pth", "rng_state_1.pth"])
    assert checkpoint_gap(tmp_path / "checkpoint-8") == "no trainer_state.json"
    assert checkpoint_gap(tmp_path / "checkpoint-12") == "no random state (rng_state*.pth)"
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def state(losses, global_step):
    """A Trainer state whose log holds these (step, loss) entries, and an evaluation."""
    log = [{"step": step, "loss": loss} for step, loss in losses] + [{"step": global_step, "eval_loss": 9.0}]
    return SimpleNamespace(log_history=log, global_step=global_step)


def test_the_train_loss_after_a_resume_is_the_whole_runs():
    # Logged every 2 steps, resumed from step 4 of 8: each logged loss is the mean over the 2 steps before it.
    metrics = {"train_loss": 0.1}
    train_loss_of_the_run(metrics, state([(2, 4.0), (4, 3.0), (6, 2.0), (8, 1.0)], 8), resumed_step=4)
    assert metrics["train_loss"] == pytest.approx((4.0 + 3.0 + 2.0 + 1.0) / 4)


def test_no_train_loss_where_the_log_misses_steps():
    # Logged every 2 steps, resumed from step 3: the loss of step 3 went with the interrupted run.
    metrics = {"train_loss": 0.1, "train_runtime": 1.0}
    train_loss_of_the_run(metrics, state([(2, 4.0), (5, 2.0), (8, 1.0)], 8), resumed_step=3)
    assert metrics == {"train_runtime": 1.0}


def test_the_record_of_a_run_is_what_the_trainer_saves(tmp_path):
    # RunRecord's state goes into trainer_state.json as the Trainer saves ExportableState callbacks.
    from transformers import TrainerState

    from run_guards import RunRecord

    record = RunRecord({"block_size": 64, "document_masking": True})
    TrainerState(stateful_callbacks=[record]).save_to_json(str(tmp_path / "trainer_state.json"))
    saved = json.loads(Path(tmp_path / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["RunRecord"]["args"]["definition"] == {"block_size": 64, "document_masking": True}
