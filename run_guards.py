"""What both scripts do around upstream run_clm.py's work, so that a run never loses or mixes up work: the lock
and checks of the output folder, the checks of the data files and of the checkpoint to resume from, and the end
of the process groups after the run.
"""

import gc
import json
import logging
import os
import socket
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


def process_is_running(pid):
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def claim_output_dir(training_args):
    """Make this run the only one in its output folder, before any work: a folder in use by a live run (its lock
    file) or holding an earlier run is refused, unless this run resumes from one of that folder's checkpoints.
    Every rank checks; then the first process takes the lock, which release_output_dir removes at the end."""
    output_dir = Path(training_args.output_dir)
    lock = output_dir / "run.lock"
    if lock.exists():
        host, pid = lock.read_text().split()
        if host != socket.gethostname() or process_is_running(int(pid)):
            raise ValueError(
                f"Output folder {output_dir} is in use by a run in progress (process {pid} on {host}): wait for it "
                f"to end or give another --output_dir; if no run is using it, delete {lock}."
            )
    earlier = sorted(p.name for p in output_dir.iterdir() if p != lock) if output_dir.is_dir() else []
    resume = training_args.resume_from_checkpoint
    resumes_here = resume is not None and Path(resume).resolve().parent == output_dir.resolve()
    if earlier and not resumes_here:
        last_checkpoint = get_last_checkpoint(str(output_dir))
        how = f"resume it with --resume_from_checkpoint {last_checkpoint}, " if last_checkpoint else ""
        files = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise ValueError(
            f"Output folder {output_dir} holds an earlier run ({files}): {how}give another --output_dir "
            "(OUTPUT_DIR for the launchers), or delete the folder."
        )
    if resumes_here:
        logger.info(f"Resuming the run in {output_dir} from {resume}.")
    elif resume is not None:
        logger.info(f"Starting a new run in {output_dir} from {resume}.")
    else:
        logger.info(f"Starting a new run in {output_dir}.")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has looked at the folder before the lock is taken
    if training_args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.unlink(missing_ok=True)  # a lock left by a run that has ended
        lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")


def release_output_dir(training_args):
    if training_args.process_index == 0:
        (Path(training_args.output_dir) / "run.lock").unlink(missing_ok=True)


def check_data_files(paths):
    """Name a missing, empty or non-UTF-8 data file before any work, rather than fail inside datasets' loaders."""
    for path in paths:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise ValueError(f"Data file {path} is missing or empty: give a text file with content.")
        try:
            with open(path, encoding="utf-8") as f:
                while f.read(1 << 24):
                    pass
        except UnicodeDecodeError as error:
            raise ValueError(
                f"Data file {path} is not UTF-8 text ({error.reason}): convert it to UTF-8 (e.g. with iconv)."
            ) from None


def check_checkpoint(checkpoint):
    """Name a damaged file of the checkpoint (a truncated copy, say) on every rank before any work, rather than
    fail on one rank inside the Trainer with an error that does not name it. Checks that each file is whole, not
    what it holds."""
    if not os.path.isdir(checkpoint):
        return  # the Trainer says it cannot find it
    for path in sorted(Path(checkpoint).iterdir()):
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(path).close()  # torch.save writes zip archives, whose index is at the end
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as error:
            raise ValueError(
                f"Checkpoint file {path} is damaged ({error}): resume from another checkpoint, or copy it again."
            ) from None


def run_main(main):
    """Run a script's main, then join the process groups' threads before the interpreter exits. A gloo worker still
    alive then can be releasing its last collective, whose saved state holds Python objects: it must take the GIL,
    CPython ends it instead, and the process aborts (SIGABRT, "terminate called without an active exception") after
    a finished run. A group's threads are joined when its last reference goes, and that must be a Python group
    object, which lets go of the GIL while joining: dropped by the Trainer's DDP reducer or by torch's registry, the
    join would hold the GIL that the worker waits for. So: keep the groups, free the Trainer (main has returned; its
    reference cycles hold them), destroy the groups, then let go of them. torch lists the groups only in its private
    registry: accelerate and the device mesh make groups that no public call returns."""
    main()
    groups = list(torch.distributed.distributed_c10d._world.pg_map) if torch.distributed.is_initialized() else []
    gc.collect()
    if groups:
        torch.distributed.destroy_process_group()
    del groups
