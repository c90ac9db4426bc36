"""FSDP2 with context parallelism trains exactly like the baseline, with the model state sharded over every process:
real multi-process CPU runs (gloo, float32) of both launchers with FSDP=1, against the baseline under FSDP2 and
under DDP, to test_cp_exactness.py's tolerances; sharded checkpoints resumed at another CP size.

accelerate runs FSDP on GPUs only. These runs let it take its FSDP path on CPU processes too (tests/fsdp_on_cpu, on
PYTHONPATH), which also records how much of the parameters, gradients and optimizer state each rank holds; without
that, the scripts refuse FSDP on CPU, which is tested on both stacks with the other refusals. The runs take minutes:
CI runs them once, on the current stack. (On the pinned stack they pass too, but for the resume, which accelerate
1.6 would do without the optimizer's moments and run_magi_clm.py refuses.)
"""

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import accelerate
import huggingface_hub
import pytest
import torch
import transformers
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from packaging import version
from safetensors.torch import save_file

import embedded_default
from bad_inputs import FSDP_BAD_INPUTS, FSDP_RESUME_BAD_INPUTS
from test_cp_exactness import GLOBAL_BATCH, assert_same_training, launch, run_args
from run_guards import ACCELERATE_RESUMES_FSDP2_OPTIMIZER, USER_ERROR_EXIT, UserError
from runs import run_origin_main, run_ranks

REPO = Path(__file__).resolve().parent.parent
SAVE_STEPS = 3
MEMORY_OPTIONS = ["--gradient_checkpointing", "--gradient_checkpointing_kwargs", '{"offload": true}',
                  "--tiled_mlp_tokens", "37"]
fsdp_runs = pytest.mark.skipif(version.parse(transformers.__version__).major < 5,
                               reason="CI runs the FSDP2 runs once, on the current stack")


def launch_fsdp(script, output_dir, nproc, cp_size=None, extra=(), offload=False):
    """A launcher run with FSDP=1 on CPU processes, and each rank's record of the model state it held."""
    probe = output_dir.parent / f"{output_dir.name}_probe"
    probe.mkdir(parents=True)
    run = launch(script, output_dir, nproc, cp_size, extra, env={
        "FSDP": "1", "OFFLOAD": "1" if offload else "0", "PYTHONPATH": str(REPO / "tests" / "fsdp_on_cpu"),
        "FSDP_PROBE_DIR": str(probe)})
    run["model_state"] = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(nproc)]
    return run


def assert_sharded_over_every_process(run, offload=False):
    """Every parameter is split along its first dimension over one mesh of all processes (dp x cp flattened, not
    HSDP's replicas of shards), and so are its gradient and AdamW state: each element is held by one process."""
    records = run["model_state"]
    world_size = len(records)
    for record in records:
        assert record["world_size"] == world_size
        assert record["meshes"] == [f"{list(range(world_size))} (Shard(dim=0),)"]
        assert record["offload_policies"] == ["CPUOffloadPolicy" if offload else "OffloadPolicy"]
    for name, per_parameter in (("parameters", 1), ("gradients", 1), ("optimizer_state", 2)):  # AdamW: 2 moments
        held = [record[name][0] for record in records]
        total = records[0]["parameters"][1] * per_parameter
        assert sum(held) == total, name
        assert max(held) <= total / world_size * 1.05, (name, held)


@pytest.fixture(scope="module")
def fsdp_baseline(tmp_path_factory):
    """run_origin_clm.sh under FSDP2, one process. (The baselines under DDP are conftest.py's, shared with
    test_cp_exactness.py.)"""
    return launch_fsdp("run_origin_clm.sh", tmp_path_factory.mktemp("fsdp_baseline") / "run", nproc=1)


@pytest.fixture(scope="module")
def cp2_run(tmp_path_factory):
    """CP 2 under FSDP2, saving sharded checkpoints every SAVE_STEPS steps."""
    output_dir = tmp_path_factory.mktemp("cp2") / "run"
    return output_dir, launch_fsdp("run_magi_clm.sh", output_dir, nproc=2, cp_size=2,
                                   extra=["--save_strategy", "steps", "--save_steps", str(SAVE_STEPS)])


@fsdp_runs
def test_cp2_under_fsdp_matches_the_baselines_and_saves_sharded_checkpoints(cp2_run, baseline, fsdp_baseline):
    output_dir, run = cp2_run
    assert_sharded_over_every_process(run)
    for reference in (baseline(1, False), fsdp_baseline):
        assert_same_training(run, reference)
    # The baseline under FSDP2 is sharded too, over its one process, and trains as under DDP.
    assert_sharded_over_every_process(fsdp_baseline)
    assert_same_training(fsdp_baseline, baseline(1, False))
    # The checkpoints are FSDP's, sharded: a torch.distributed.checkpoint folder for the weights and one for the
    # optimizer state, each with a file per process; the final model is saved whole.
    checkpoint = output_dir / f"checkpoint-{SAVE_STEPS}"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()
    assert (output_dir / "model.safetensors").exists()


@fsdp_runs
def test_cp2_x_dp2_under_fsdp_with_document_masking_matches_the_baseline(baseline, tmp_path):
    # Against the baseline under DDP only, which the CP 2 test shows the one under FSDP2 to equal: one run less.
    run = launch_fsdp("run_magi_clm.sh", tmp_path / "run", nproc=4, cp_size=2, extra=run_args(2, True))
    assert f"Global batch: {GLOBAL_BATCH} samples a step" in run["log"]
    assert_sharded_over_every_process(run)
    assert_same_training(run, baseline(2, True))


@fsdp_runs
def test_sharded_checkpoint_resumes_at_cp3_with_offload_and_the_memory_options(cp2_run, baseline, fsdp_baseline,
                                                                               tmp_path):
    """The CP 2 run's checkpoint at step 3, resumed by 3 processes at CP 3 (torch.distributed.checkpoint reshards the
    weights and the optimizer state), with FSDP2's parameter and optimizer offload and the memory options: steps 4
    to 6 and the final weights as the baselines'."""
    output_dir, _ = cp2_run
    checkpoint = output_dir / f"checkpoint-{SAVE_STEPS}"
    run = launch_fsdp("run_magi_clm.sh", tmp_path / "run", nproc=3, cp_size=3, offload=True,
                      extra=["--resume_from_checkpoint", str(checkpoint), *MEMORY_OPTIONS])
    assert f"Starting a new run in {tmp_path / 'run'} from {checkpoint}." in run["log"]
    assert "Context parallelism over 3 ranks" in run["log"]
    assert "keeps the checkpointed layer inputs in CPU memory" in run["log"]
    assert "MLP runs over tiles of 37 tokens" in run["log"]
    assert_sharded_over_every_process(run, offload=True)
    for reference in (baseline(1, False), fsdp_baseline):
        # transformers 5's speed metrics count the steps this run trained, 4.51's all: not compared.
        assert_same_training({**run, "train": reference["train"]}, reference)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A short text, a checkpoint folder as the Trainer writes it without FSDP (whole weights and optimizer state),
    and one as it writes it under FSDP2 (its folders: what the scripts' checks look at)."""
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "small.txt").write_text(Path(embedded_default.prepare_default_corpus()[0]).read_text()[:20000])
    ddp, fsdp = tmp / "ddp" / "checkpoint-5", tmp / "fsdp" / "checkpoint-5"
    ddp.mkdir(parents=True)
    save_file({"lm_head.weight": torch.zeros(2, 2)}, ddp / "model.safetensors")
    torch.save({"state": {}, "param_groups": []}, ddp / "optimizer.pt")
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (fsdp / folder).mkdir(parents=True)
    return tmp


def filled_in(text, tmp):
    return text.format(tmp=tmp, accelerate=accelerate.__version__)


@pytest.mark.parametrize("case, extra, env, message", FSDP_BAD_INPUTS, ids=[row[0] for row in FSDP_BAD_INPUTS])
def test_fsdp_that_cannot_run_is_refused_before_training(inputs, tmp_path, case, extra, env, message):
    args = ["--output_dir", str(tmp_path / "out"), "--do_train", "--max_steps", "1", "--block_size", "64",
            "--train_file", f"{inputs}/small.txt", "--use_cpu", "--ddp_backend", "gloo", "--report_to", "none"]
    results = run_ranks(args + [filled_in(a, inputs) for a in extra], world_size=1, env=env)
    for output, returncode in results:
        assert returncode == USER_ERROR_EXIT, output[-3000:]
        assert output.strip().splitlines()[-1] == f"run_magi_clm.py: error: {filled_in(message, inputs)}", \
            output[-3000:]
        assert "Running training" not in output


@pytest.mark.parametrize("case, extra, env, message", [
    pytest.param(*row, id=row[0], marks=pytest.mark.skipif(
        "accelerate 1.6-1.9" in row[0] and ACCELERATE_RESUMES_FSDP2_OPTIMIZER, reason="this accelerate resumes it"))
    for row in FSDP_RESUME_BAD_INPUTS])
def test_an_fsdp_resume_that_would_not_be_exact_is_refused(inputs, tmp_path, monkeypatch, case, extra, env, message):
    # Checked by both scripts (run_guards.py): here run_origin_clm.py's, in this process.
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, "--output_dir", str(tmp_path / "out"), "--do_train", "--block_size", "64",
                        "--train_file", f"{inputs}/small.txt", *[filled_in(a, inputs) for a in extra], env=env)
    assert str(error.value) == filled_in(message, inputs)


NO_RESPONSE = SimpleNamespace(headers={}, request=None)  # what the Hub's errors read of the HTTP response


@pytest.mark.parametrize("error, message", [
    (GatedRepoError("gated", response=NO_RESPONSE), "RECIPE=full needs access to the gated meta-llama/Llama-3.1-8B: "
     "accept its license on huggingface.co, then log in with huggingface-cli login (or set HF_TOKEN)"),
    (RepositoryNotFoundError("missing", response=NO_RESPONSE), "MODEL=meta-llama/Llama-3.1-8B is no model on the "
     "Hugging Face Hub that this login can see: check the name (or log in with huggingface-cli login)"),
    (OSError("offline"), "RECIPE=full needs the Hugging Face Hub, which this machine cannot reach (OSError): use "
     "RECIPE=default here"),
], ids=["gated", "missing", "offline"])
def test_full_recipe_check_names_the_model_it_is_given(monkeypatch, error, message):
    # As on a machine with GPUs: the launchers' test of a machine without (test_launchers.py) stops before the Hub.
    def auth_check(model):
        raise error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    monkeypatch.setattr(sys, "argv", ["check_full_recipe.py", "meta-llama/Llama-3.1-8B"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "check_full_recipe.py"))
    assert exit_.value.code == message
