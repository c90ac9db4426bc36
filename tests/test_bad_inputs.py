"""Bad input stops a run before any work with one line that names the problem and the fix, and exit code 2
(tests/bad_inputs.py lists them), checked in this process: the checks both scripts share with run_origin_clm.py,
the CP script's own with run_magi_clm.py. Ranks that meet a bad input alone say so too. (Through the launchers, a job
says the line once, without a traceback or torchrun's report: tests/test_launchers.py.)"""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import transformers
from huggingface_hub import constants as hub_constants
from transformers import AutoTokenizer

import embedded_default
from bad_inputs import BAD_INPUTS, CP_BAD_INPUTS
from run_guards import USER_ERROR_EXIT, UserError
from runs import fake_checkpoint, run_magi_main, run_origin_main, run_ranks


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
    lines = small_text.splitlines()[:40]
    for name, records in [("titled", [{"title": line[:10], "content": line} for line in lines]),
                          ("numbers", [{"text": i} for i in range(40)]),
                          ("holes", [{"text": line} for line in lines[:-1]] + [{"title": "no text"}])]:
        (tmp / f"{name}.json").write_text("\n".join(json.dumps(r) for r in records))
    # Output folders: an earlier run with a complete and an incomplete checkpoint (killed while saving), a finished
    # run, and one that a live process (this one) holds.
    fake_checkpoint(tmp / "earlier" / "checkpoint-30", 30, 100)
    fake_checkpoint(tmp / "earlier" / "checkpoint-35", 35, 100, leave_out=["trainer_state.json"])
    fake_checkpoint(tmp / "finished" / "checkpoint-100", 100, 100)
    for name in ("trainer_state.json", "all_results.json"):
        (tmp / "finished" / name).write_text("{}")
    (tmp / "busy").mkdir()
    (tmp / "busy" / "run.lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    # Checkpoints: a random state copied incompletely, no optimizer state, no schedule, a state of other content.
    fake_checkpoint(tmp / "damaged", 5, 10)
    rng_state = tmp / "damaged" / "rng_state_1.pth"
    rng_state.write_bytes(rng_state.read_bytes()[:200])
    fake_checkpoint(tmp / "no_optimizer", 5, 10, leave_out=["optimizer.pt"])
    fake_checkpoint(tmp / "no_scheduler", 5, 10, leave_out=["scheduler.pt"])
    fake_checkpoint(tmp / "not_a_state", 5, 10)
    (tmp / "not_a_state" / "trainer_state.json").write_text('["a", "list"]')
    return tmp, tokenizer


def expected(message, tmp):
    return message.format(tmp=tmp, cwd=os.getcwd(), host=socket.gethostname(), pid=os.getpid())


@pytest.mark.parametrize("extra, env, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_before_any_work(data, tmp_path, monkeypatch, extra, env, message):
    tmp, tokenizer = data
    good = ["--tokenizer_name", tokenizer, "--train_file", f"{tmp}/small.txt", "--block_size", "64",
            "--output_dir", str(tmp_path / "out"), "--do_train", "--max_steps", "2"]
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # as the launchers set it
    # The last occurrence of an argument wins.
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, *good, *[a.format(tmp=tmp) for a in extra], env=env)
    assert str(error.value) == expected(message, tmp)
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.parametrize("extra, env, message", [c[1:] for c in CP_BAD_INPUTS], ids=[c[0] for c in CP_BAD_INPUTS])
def test_a_bad_input_of_the_cp_script_is_refused_before_any_work(data, tmp_path, monkeypatch, extra, env, message):
    tmp, tokenizer = data
    good = ["--cp_size", "1", "--tokenizer_name", tokenizer, "--train_file", f"{tmp}/small.txt",
            "--validation_file", f"{tmp}/small.txt", "--block_size", "64", "--output_dir", str(tmp_path / "out"),
            "--do_train"]
    with pytest.raises(UserError) as error:
        run_magi_main(monkeypatch, *good, *[a.format(tmp=tmp) for a in extra], env=env)
    assert str(error.value) == expected(message, tmp)
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_a_rank_that_meets_a_bad_input_alone_says_so(data, tmp_path):
    # Ranks started by hand, as a cluster scheduler does, with nothing to end the others: each says it, rank 1
    # some seconds after rank 0.
    tmp, tokenizer = data
    results = run_ranks(["--cp_size", "2", "--tokenizer_name", tokenizer, "--train_file", f"{tmp}/utf16.txt",
                         "--output_dir", str(tmp_path / "out"), "--do_train", "--use_cpu", "--ddp_backend", "gloo",
                         "--report_to", "none"])
    for output, returncode in results:
        assert returncode == USER_ERROR_EXIT, output[-3000:]
        assert output.strip().splitlines()[-1] == expected(
            "run_magi_clm.py: error: Data file {tmp}/utf16.txt is not UTF-8 text (invalid start byte): convert it "
            "to UTF-8 (e.g. with iconv).", tmp)


def test_validation_file_without_train_file_is_refused(data, tmp_path, monkeypatch):
    # Not a row of BAD_INPUTS, whose good arguments give --train_file.
    tmp, tokenizer = data
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, "--tokenizer_name", tokenizer, "--validation_file", f"{tmp}/small.txt",
                        "--output_dir", str(tmp_path / "out"), "--do_train")
    assert str(error.value) == ("--validation_file was given without --train_file: give --train_file too, or "
                                "neither to train on the embedded default.")


def test_overwrite_output_dir_is_named(data, tmp_path, monkeypatch):
    # transformers 4.51 takes the argument (and 5 does not): it does not clear an earlier run, and the refusal
    # says so.
    tmp, tokenizer = data
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, "--tokenizer_name", tokenizer, "--train_file", f"{tmp}/small.txt",
                        "--output_dir", f"{tmp}/earlier", "--do_train", "--overwrite_output_dir")
    if transformers.__version__.startswith("4."):
        assert str(error.value).startswith(
            f"Output folder {tmp}/earlier holds an earlier run (checkpoint-30, checkpoint-35), whose checkpoint-35 is "
            "incomplete, which --overwrite_output_dir does not delete: resume it with")
    else:
        assert str(error.value) == "unrecognized arguments: --overwrite_output_dir: see --help."


def test_forcing_the_real_magi_attention_that_is_not_installed_is_refused():
    import magi_utils

    try:
        import magi_attention.api  # noqa: F401

        pytest.skip("the real MagiAttention is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError) as error:
        magi_utils.load_magi_api("magi")
    assert str(error.value).startswith("MAGI_ATTENTION_BACKEND=magi but magi_attention.api is not importable")


def test_help_lists_the_baselines_arguments_and_cp_size(monkeypatch, capsys):
    # run_magi_clm.py takes every argument of run_origin_clm.py, and --cp_size.
    import run_magi_clm
    import run_origin_clm

    def options(script):
        monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", "--help"])
        with pytest.raises(SystemExit) as exit:
            script.main()
        assert exit.value.code == 0
        return {word.rstrip(",") for word in capsys.readouterr().out.split() if word.startswith("--")}

    magi, origin = options(run_magi_clm), options(run_origin_clm)
    assert magi - origin == {"--cp_size", "--cp-size"}
    assert origin <= magi
