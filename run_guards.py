"""What both scripts do around upstream run_clm.py's work, so that a run never trains something other than what was
asked, nor overwrites or mixes up work: the checks of the arguments, data files, output folder and checkpoint before
any work, the record of what defines a run in each checkpoint, the lock of the output folder, and how a run ends:
a bad input in one line, a full disk named as such, the process groups ended before the interpreter exits.
"""

import errno
import gc
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import accelerate
import torch
from accelerate.utils import DistributedType
from accelerate.utils.constants import FSDP_MODEL_NAME
from datasets import Value
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from packaging import version
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import HfArgumentParser, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

USER_ERROR_EXIT = 2  # as argparse's: the run refused its input and said why (scripts/torchrun.py reads it)
LOCK = "run.lock"
held_locks = []  # the output folder's lock this process took: let go of at the end, or on a bad input met later
# A checkpoint's model weights and optimizer state: whole files, or FSDP's sharded folders.
WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "pytorch_model_fsdp.bin",
           "pytorch_model_fsdp_0")
OPTIMIZER_STATES = (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, "optimizer_0")
# What a run writes in its output folder beside its checkpoints (the model card, README.md, is not told apart from
# a README of the user's).
RUN_FILES = (TRAINER_STATE_NAME, "training_args.bin", "all_results.json", "train_results.json", "eval_results.json",
             CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# What a training step computes, beside the global batch: a resume must keep them. The CP size, how the global
# batch is placed (per-device batch, accumulation, processes) and the memory options are free to change.
RUN_DEFINITION = {
    "model": ("model_name_or_path", "model_type", "config_name", "config_overrides", "tokenizer_name",
              "model_revision", "torch_dtype"),
    "data": ("dataset_name", "dataset_config_name", "train_file", "validation_split_percentage", "max_train_samples",
             "streaming", "block_size", "keep_linebreaks", "text_sample_by", "document_masking"),
    "training": ("seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm", "optim", "optim_args", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                 "warmup_ratio", "bf16", "fp16", "label_smoothing_factor", "average_tokens_across_devices"),
}


class UserError(ValueError):
    """Input the run cannot take (an argument, a data file, the output folder, a checkpoint), with a message that
    names the problem and the fix: run_main prints it in one line instead of a traceback."""


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser without abbreviations (--cp_s would set --cp_size past the launchers' check of the global
    batch), whose errors are UserErrors: one line, not the usage of every option from every rank."""

    def __init__(self, dataclass_types):
        super().__init__(dataclass_types, allow_abbrev=False)

    def error(self, message):
        raise UserError(f"{message}: see --help.")

    def parse_args_into_dataclasses(self):
        try:
            *parsed, unknown = super().parse_args_into_dataclasses(return_remaining_strings=True)
        except ValueError as error:  # the dataclasses' checks of their values (TrainingArguments' too)
            raise UserError(str(error)) from None
        if unknown:
            raise UserError(f"unrecognized arguments: {' '.join(unknown)}: see --help.")
        return parsed

    def parse_json_file(self, *args, **kwargs):
        try:
            return super().parse_json_file(*args, **kwargs)
        except ValueError as error:
            raise UserError(str(error)) from None


def run_main(main):
    """Run a script's main: a UserError ends the job with its message in one line and exit code 2.

    Local rank 0 says it at once; another rank only if it is still running a few seconds later (an input of its
    own, say a file missing on its node): torchrun ends the other processes of the job as soon as one exits.

    After main, the process groups' threads are joined before the interpreter exits. A gloo worker still alive
    then can be releasing its last collective, whose saved state holds Python objects: it must take the GIL,
    CPython ends it instead, and the process aborts (SIGABRT, "terminate called without an active exception")
    after a finished run. A group's threads are joined when its last reference goes, and that must be a Python group
    object, which lets go of the GIL while joining: dropped by the Trainer's DDP reducer or by torch's registry, the
    join would hold the GIL that the worker waits for. So: keep the groups, free the Trainer (main has returned;
    its reference cycles hold them), destroy the groups, then let go of them. torch lists the groups only in its
    private registry: accelerate and the device mesh make groups that no public call returns."""
    stop_when_the_launcher_is_gone()
    try:
        main()
    except UserError as error:
        if int(os.environ.get("LOCAL_RANK", 0)) != 0:
            time.sleep(5)
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr, flush=True)
        release_output_dir()
        logging.shutdown()
        sys.stdout.flush()
        # At once: with a process group up, the interpreter's shutdown can take seconds, and torchrun ends the
        # other ranks only once this one has ended.
        os._exit(USER_ERROR_EXIT)
    groups = list(torch.distributed.distributed_c10d._world.pg_map) if torch.distributed.is_initialized() else []
    gc.collect()
    if groups:
        torch.distributed.destroy_process_group()
    del groups


def stop_when_the_launcher_is_gone():
    """torchrun starts each rank in a session of its own, which a kill of torchrun's agent does not reach: the ranks
    would train on to the end and write results that no one waits for. A thread checks every second that the
    process that started this one is still its parent, and ends the process when it is not."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        print(f"{Path(sys.argv[0]).name}: its launcher (process {parent}) is gone: stopping.", file=sys.stderr,
              flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher watch", daemon=True).start()


def check_arguments(model_args, data_args, training_args, data_parallel_size):
    """What the arguments alone say is wrong, before any work."""
    if training_args.do_train and training_args.max_steps == 0:
        raise UserError("--max_steps 0 would train nothing (the Trainer trains one step): give a positive "
                        "--max_steps (MAX_STEPS for the launchers), or leave it unset to train --num_train_epochs.")
    launcher_batch = os.environ.get("GLOBAL_BATCH")
    if training_args.do_train and launcher_batch is not None and \
            int(launcher_batch) != global_batch(training_args, data_parallel_size):
        raise UserError(
            f"The arguments make a global batch of {global_batch(training_args, data_parallel_size)} samples a step (per_device_train_batch_size "
            f"{training_args.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{training_args.gradient_accumulation_steps} x {data_parallel_size} data-parallel replicas), not "
            f"GLOBAL_BATCH={launcher_batch}: set GLOBAL_BATCH, PER_DEVICE_BATCH or CP_SIZE for the launchers instead "
            "of --per_device_train_batch_size, --gradient_accumulation_steps or --cp_size."
        )
    for argument, file in (("model_name_or_path", CONFIG_NAME), ("config_name", CONFIG_NAME),
                           ("tokenizer_name", "tokenizer_config.json")):
        check_model_source(argument, getattr(model_args, argument), file, model_args.cache_dir)


def global_batch(training_args, data_parallel_size):
    """Samples a step."""
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * data_parallel_size


def check_model_source(argument, name, file, cache_dir):
    """A folder that does not exist is named as such, rather than taken for a model of the Hub."""
    if name is None or os.path.exists(name):
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"--{argument} {name}: there is no such folder: give the path of an existing one.") from None
    if hub_constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, file, cache_dir=cache_dir), str):
        raise UserError(
            f"--{argument} {name}: there is no such folder ({os.path.abspath(name)}), and no model {name} in the "
            "Hub's cache, which is all the Hub there is with HF_HUB_OFFLINE=1 (the launchers' default): give the "
            "path of an existing folder, or set HF_HUB_OFFLINE=0 to download it."
        )


def check_data_files(paths):
    """Name a missing, empty or non-UTF-8 data file before any work, rather than fail inside datasets' loaders."""
    for path in paths:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise UserError(f"Data file {path} is missing or empty: give a text file with content.")
        try:
            with open(path, encoding="utf-8") as f:
                while f.read(1 << 24):
                    pass
        except UnicodeDecodeError as error:
            raise UserError(
                f"Data file {path} is not UTF-8 text ({error.reason}): convert it to UTF-8 (e.g. with iconv)."
            ) from None


def check_validation_split(train, percentage, source):
    """Without a validation split, evaluation takes --validation_split_percentage of the training examples, which
    must be one at least (datasets rounds the share to the closest whole number)."""
    if round(len(train) * percentage / 100) == 0:
        raise UserError(
            f"--validation_split_percentage {percentage} of the {len(train)} examples of {source} is no example to "
            "evaluate on (with --text_sample_by document a file is one example): give --validation_file."
        )


def text_column(raw_datasets, source):
    """The column that is trained on: 'text', else the only column of text, which the log names. Refused: no column
    of text, several without one named 'text', or records without it."""
    columns = next(iter(raw_datasets.values())).features
    if columns is None:  # a streamed dataset whose columns are known only once read: as run_clm
        return "text"
    texts = [name for name, feature in columns.items()
             if isinstance(feature, Value) and feature.dtype in ("string", "large_string")]
    if "text" in columns:
        name = "text"
    elif len(texts) == 1:
        name = texts[0]
        logger.info(f"Training on the column '{name}' of {source}, its only column of text.")
    else:
        listing = ", ".join(f"{n} ({getattr(f, 'dtype', type(f).__name__)})" for n, f in columns.items())
        raise UserError(f"{source} has no column 'text' to train on, and {len(texts)} columns of text ({listing}): "
                        "name the column to train on 'text'.")
    for split, dataset in raw_datasets.items():
        feature = dataset.features[name]
        if name not in texts:
            raise UserError(f"Column '{name}' of {source} holds {getattr(feature, 'dtype', feature)}, not text: "
                            f"give text in '{name}', or name the column of text 'text'.")
        missing = dataset.data.column(name).null_count
        if missing:
            raise UserError(f"{missing} of the {len(dataset)} records of the {split} data ({source}) have no "
                            f"'{name}': give every record a '{name}'.")
    return name


def run_definition(model_args, data_args, training_args, data_parallel_size):
    """What defines the run (RUN_DEFINITION and the global batch), as given: local paths made absolute."""
    training = training_args.to_dict()
    definition = {name: getattr(model_args, name) for name in RUN_DEFINITION["model"]}
    definition.update({name: getattr(data_args, name) for name in RUN_DEFINITION["data"]})
    definition.update({name: training.get(name) for name in RUN_DEFINITION["training"]})
    for name in RUN_DEFINITION["model"] + RUN_DEFINITION["data"]:
        if isinstance(definition[name], str) and os.path.exists(definition[name]):
            definition[name] = os.path.abspath(definition[name])
    # One replica normalizes a step's loss by all its tokens either way (the Trainer turns the option off in one
    # process): runs that differ only there compute the same steps.
    definition["average_tokens_across_devices"] = training_args.average_tokens_across_devices or data_parallel_size == 1
    definition["global_batch"] = global_batch(training_args, data_parallel_size)
    return json.loads(json.dumps(definition))  # as it reads back from a checkpoint


class RunRecord(TrainerCallback, ExportableState):
    """Keeps the run's definition in each checkpoint's trainer_state.json (the Trainer saves the state of
    ExportableState callbacks there), and refuses at the start of training a resume with no step left to train,
    which the Trainer would train one step past its end."""

    def __init__(self, definition, resumed=None):
        self.definition = definition
        self.resumed = resumed  # (checkpoint, its trainer state) when resuming

    def state(self):
        return {"args": {"definition": self.definition}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resumed is None or state.global_step < state.max_steps:
            return
        checkpoint, checkpoint_state = self.resumed
        if checkpoint_state["global_step"] >= checkpoint_state["max_steps"]:
            raise UserError(
                f"Checkpoint {checkpoint} ends a finished run (step {checkpoint_state['global_step']} of "
                f"{checkpoint_state['max_steps']}): there is nothing left to train. To train it further, resume with "
                "a larger --max_steps (MAX_STEPS for the launchers); to train anew, give another --output_dir."
            )
        raise UserError(
            f"Checkpoint {checkpoint} is at step {state.global_step}, and this run ends at step {state.max_steps}: "
            f"give a --max_steps (MAX_STEPS for the launchers) above {state.global_step} to train on from it."
        )


def read_trainer_state(checkpoint):
    """The checkpoint's trainer state, or None where it has none that the Trainer could resume from."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(state, dict) and isinstance(state.get("global_step"), int)
            and isinstance(state.get("max_steps"), int) and isinstance(state.get("log_history"), list)):
        return None
    return state


def checkpoint_gap(checkpoint):
    """What the checkpoint lacks to resume its run exactly (the Trainer would go on with a fresh optimizer and
    learning-rate schedule without a word), or None for a complete one."""
    names = set(os.listdir(checkpoint))
    if TRAINER_STATE_NAME not in names:
        return f"no {TRAINER_STATE_NAME}"
    if read_trainer_state(checkpoint) is None:
        return f"its {TRAINER_STATE_NAME} is not the state of a Trainer"
    if not names & set(WEIGHTS):
        return f"no model weights ({SAFE_WEIGHTS_NAME})"
    if not names & set(OPTIMIZER_STATES):
        return f"no optimizer state ({OPTIMIZER_NAME})"
    if SCHEDULER_NAME not in names:
        return f"no learning-rate schedule ({SCHEDULER_NAME})"
    if not any(name.startswith("rng_state") for name in names):
        return "no random state (rng_state*.pth)"
    return None


def checkpoints(output_dir):
    """The checkpoint folders of a run, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]))


def last_complete_checkpoint(output_dir):
    complete = [c for c in checkpoints(output_dir) if checkpoint_gap(c) is None]
    return complete[-1] if complete else None


# transformers 5 hands accelerate fsdp_config's "fsdp_version" (2 when unset); transformers 4.51 hands it no version,
# and accelerate 1.6 reads FSDP_VERSION from the environment (1 when unset), as `accelerate launch` sets it.
def fsdp_version(training_args):
    """The FSDP version accelerate will run: from --fsdp, or from accelerate launch's config; None without FSDP."""
    if not training_args.fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    plugin_args = getattr(training_args, "fsdp_plugin_args", None) or {}
    return int(plugin_args.get("fsdp_version") or os.environ.get("FSDP_VERSION", "1"))


# accelerate 1.6-1.9 load FSDP2's sharded optimizer state into the optimizer's own state_dict(), which is empty
# before the first step: a resumed run's AdamW moments would start anew. accelerate 1.15 builds the full one first.
ACCELERATE_RESUMES_FSDP2_OPTIMIZER = version.parse(accelerate.__version__) >= version.parse("1.10.0")


def check_checkpoint(training_args, definition):
    """Before any work, on every rank: the checkpoint to resume from is one this run resumes exactly (complete, saved
    the same way, with or without FSDP), its files whole (a truncated copy, say: the Trainer would fail on one rank
    with an error that does not name it), and its run the same as this one. Returns its trainer state."""
    checkpoint = Path(training_args.resume_from_checkpoint).absolute()
    if not checkpoint.is_dir():
        raise UserError(f"--resume_from_checkpoint {checkpoint}: there is no such folder: give a checkpoint folder "
                        "(checkpoint-N in a run's output folder).")
    fsdp = fsdp_version(training_args)
    # The Trainer loads an FSDP run's model and optimizer state only from FSDP's own files (pytorch_model_fsdp_0/,
    # optimizer_0/ or their .bin files); it refuses the opposite case itself.
    if fsdp and not any(path.name.startswith(FSDP_MODEL_NAME) for path in checkpoint.iterdir()):
        raise UserError(
            f"{checkpoint} was saved without FSDP, and an FSDP run resumes only from a checkpoint saved under FSDP: "
            f"resume it without --fsdp, or start a new FSDP run from its weights with --model_name_or_path "
            f"{checkpoint} (the optimizer state and the step count start anew)."
        )
    if fsdp == 2 and not ACCELERATE_RESUMES_FSDP2_OPTIMIZER:
        raise UserError(
            f"accelerate {accelerate.__version__} would resume {checkpoint} without AdamW's moments (it restores "
            "FSDP2's optimizer state into an optimizer that has none yet): FSDP runs resume exactly on the current "
            "stack (pip install -r requirements-current.txt), from checkpoints saved there."
        )
    gap = checkpoint_gap(checkpoint)
    if gap is not None:
        other = last_complete_checkpoint(checkpoint.parent)
        instead = f"resume from {other}, the last complete checkpoint, or " if other else ""
        raise UserError(
            f"Checkpoint {checkpoint} is incomplete ({gap}), so it cannot resume its run exactly: {instead}start a "
            f"new run from its weights (--model_name_or_path {checkpoint}) in another --output_dir."
        )
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(path).close()  # torch.save writes zip archives, whose index is at the end
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as error:
            raise UserError(
                f"Checkpoint file {path} is damaged ({error}): resume from another checkpoint, or copy it again."
            ) from None
    state = read_trainer_state(checkpoint)
    recorded = state.get("stateful_callbacks", {}).get(RunRecord.__name__, {}).get("args", {}).get("definition")
    if recorded is None:
        logger.warning(f"Checkpoint {checkpoint} holds no record of its run's settings: this run's cannot be "
                       "checked against them.")
        return state
    changed = [f"{name} {recorded.get(name)!r} there, {value!r} here" for name, value in definition.items()
               if recorded.get(name) != value]
    if changed:
        raise UserError(
            f"Checkpoint {checkpoint} was trained with other settings: {'; '.join(changed)}. A resume goes on with "
            "the same run: give its settings, or start a new run from the checkpoint's weights (--model_name_or_path "
            f"{checkpoint}) in another --output_dir."
        )
    return state


def lock_owner(lock):
    """(host, pid) of the run that holds the lock, or None: no lock, or an empty or unreadable one (left by a run
    that could not write it whole: a full disk, say), which holds nothing."""
    try:
        host, pid = lock.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def claim_output_dir(training_args):
    """Make this run the only one in its output folder, before any work: a folder in use by a live run (its lock
    file) or holding an earlier run is refused, unless this run resumes from one of that folder's checkpoints.
    Files that no run writes (notes.txt, .gitkeep) may stay. Every rank checks; then the first process takes the
    lock, which release_output_dir removes at the end."""
    output_dir = Path(training_args.output_dir).absolute()
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file: give a folder (OUTPUT_DIR for the launchers).")
    lock = output_dir / LOCK
    owner = lock_owner(lock)
    if owner is not None and (owner[0] != socket.gethostname() or process_is_running(owner[1])):
        raise UserError(
            f"Output folder {output_dir} is in use by a run in progress (process {owner[1]} on {owner[0]}): wait for "
            f"it to end or give another --output_dir; if no run is using it, delete {lock}."
        )
    if owner is None and lock.exists():
        logger.warning(f"{lock} names no run (it is empty or unreadable): taking it.")
    resume = training_args.resume_from_checkpoint
    resumes_here = resume is not None and Path(resume).resolve().parent == output_dir.resolve()
    entries = sorted(p.name for p in output_dir.iterdir() if p != lock) if output_dir.is_dir() else []
    earlier = [name for name in entries if name in RUN_FILES or name in {c.name for c in checkpoints(output_dir)}]
    if earlier and not resumes_here:
        raise UserError(earlier_run_message(output_dir, earlier, getattr(training_args, "overwrite_output_dir", False)))
    others = [name for name in entries if name not in earlier]
    if others and not resumes_here:
        logger.info(f"Output folder {output_dir} holds files of no run ({', '.join(others[:3])}"
                    f"{', ...' if len(others) > 3 else ''}): the run writes beside them.")
    if resumes_here:
        logger.info(f"Resuming the run in {output_dir} from {Path(resume).absolute()}.")
    elif resume is not None:
        logger.info(f"Starting a new run in {output_dir} from {Path(resume).absolute()}.")
    else:
        logger.info(f"Starting a new run in {output_dir}.")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has looked at the folder before the lock is taken
    if training_args.process_index == 0:
        # Written whole or not at all: a run that reads the lock meanwhile never finds it empty.
        partial = output_dir / f".{LOCK}.{os.getpid()}"
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            partial.write_text(f"{socket.gethostname()} {os.getpid()}\n")
            partial.replace(lock)
            held_locks.append(lock)
        except OSError as error:
            if partial.exists():
                partial.unlink()
            what, remedy = why_not_written(output_dir, error)
            raise UserError(f"{what}, so the run cannot start in it: {remedy}, or give another --output_dir.") from None


def earlier_run_message(output_dir, earlier, overwrite):
    files = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
    incomplete = [c.name for c in checkpoints(output_dir) if checkpoint_gap(c) is not None]
    last = last_complete_checkpoint(output_dir)
    message = f"Output folder {output_dir} holds an earlier run ({files})"
    if incomplete:
        message += f", whose {', '.join(incomplete)} {'is' if len(incomplete) == 1 else 'are'} incomplete"
    if overwrite:
        message += ", which --overwrite_output_dir does not delete"
    if last is None:
        how = ""
    else:
        state = read_trainer_state(last)
        if state["global_step"] >= state["max_steps"]:
            how = (f"it is finished (step {state['global_step']} of {state['max_steps']}): to train it further, "
                   f"resume from {last} with a larger --max_steps (MAX_STEPS for the launchers), or ")
        else:
            how = f"resume it with --resume_from_checkpoint {last}, "
    return f"{message}: {how}give another --output_dir (OUTPUT_DIR for the launchers), or delete the folder."


def release_output_dir():
    while held_locks:
        held_locks.pop().unlink(missing_ok=True)


def process_is_running(pid):
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def why_not_written(folder, error):
    """('The disk of F is full', 'make room') or ('F cannot be written (reason)', 'make it writable') when that is why
    a write failed, else None. The errors do not always say so: torch's writer on a full disk says "unexpected pos", and the other ranks see only
    a collective whose peer is gone."""
    folder = Path(folder).absolute()
    errnos = set()
    while error is not None:
        if isinstance(error, OSError):
            errnos.add(error.errno)
        error = error.__cause__ or error.__context__
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    full = f"The disk of {folder} is full ({free} bytes free)", "make room"
    if errnos & {errno.ENOSPC, errno.EDQUOT}:
        return full
    for number in (errno.EROFS, errno.EACCES, errno.EPERM):
        if number in errnos:
            return f"{folder} cannot be written ({os.strerror(number)})", "make it writable"
    if free < 1 << 20:
        return full
    if not os.access(existing, os.W_OK):
        return f"{folder} cannot be written", "make it writable"
    return None


@contextmanager
def writes_explained(output_dir):
    """A full disk or a folder that cannot be written, met while training and saving, is said once, with where the
    run stands: which checkpoint was being written, and the last complete one."""
    try:
        yield
    except Exception as error:
        why = why_not_written(output_dir, error)
        if why is None:
            raise
        what, remedy = why
        written = checkpoints(output_dir)
        where = f" while writing {written[-1].name}" if written and checkpoint_gap(written[-1]) else ""
        last = last_complete_checkpoint(output_dir)
        then = (f"the last complete checkpoint is {last}: {remedy}, then resume from it (--resume_from_checkpoint)"
                if last else f"no checkpoint is complete: {remedy}, then start again")
        raise UserError(f"{what}{where}: {then}.") from error


def train_loss_of_the_run(metrics, state, resumed_step):
    """After a resume, the Trainer's train_loss covers the resumed steps only (transformers 5: their mean; 4.51:
    their sum over all the run's steps). The run's figure comes from the log, whose losses are the mean over the
    steps since the one logged before (a resume logs on from its checkpoint's step): exact where the log covers
    every step, that is where the checkpoint's step and the last step were logged."""
    losses = {entry["step"]: entry["loss"] for entry in state.log_history if "loss" in entry}
    if resumed_step not in losses or state.global_step not in losses:
        del metrics["train_loss"]
        logger.warning("No train_loss for the run: its log does not hold the loss of every step (--logging_steps "
                       "does not divide the checkpoint's step and the last): see the logged losses instead.")
        return
    total, previous = 0.0, 0
    for step in sorted(losses):
        total += losses[step] * (step - previous)
        previous = step
    metrics["train_loss"] = total / state.global_step


def check_fsdp_took_effect(trainer):
    """accelerate runs FSDP on GPUs only: on CPU processes it would train with DDP instead, without a word."""
    if trainer.args.fsdp and trainer.accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(
            "--fsdp: accelerate runs FSDP on GPUs only, and would train these CPU processes with DDP instead, the "
            "whole model state on each: drop --fsdp here (FSDP=1 for the launchers), or run on GPUs."
        )


def save_model(trainer):
    """trainer.save_model(), which under FSDP with sharded state dicts (the only kind accelerate 1.6's FSDP2 takes)
    leaves the weights to the checkpoints: the final model is saved whole, as without FSDP, gathered a tensor at a
    time into rank 0's CPU memory."""
    if not (trainer.is_fsdp_enabled and "SHARDED" in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)):
        trainer.save_model()
        return
    state_dict = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.args.should_save:
        trainer._save(trainer.args.output_dir, state_dict=state_dict)  # what save_model calls: the tokenizer too
