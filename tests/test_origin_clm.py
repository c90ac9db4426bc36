"""The plain trainer: arguments, block grouping, data checks. (Its runs through the launcher: test_resume.py.)"""

import re
from pathlib import Path

import pytest
from transformers import HfArgumentParser, TrainingArguments

import embedded_default
from run_guards import UserError
from run_origin_clm import DataTrainingArguments, ModelArguments, group_texts, load_raw_datasets
from runs import run_origin_main

UPSTREAM_MODEL_ARGS = {
    "model_name_or_path": "some/model", "model_type": "llama", "config_name": "cfg", "tokenizer_name": "tok",
    "cache_dir": "/tmp/cache", "use_fast_tokenizer": False, "model_revision": "v1", "token": "hf_x",
    "trust_remote_code": True, "torch_dtype": "bfloat16", "low_cpu_mem_usage": True,
}
UPSTREAM_DATA_ARGS = {
    "dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1", "train_file": "a.txt",
    "validation_file": "b.txt", "max_train_samples": 7, "max_eval_samples": 3, "streaming": True,
    "block_size": 128, "overwrite_cache": True, "validation_split_percentage": 10,
    "preprocessing_num_workers": 2, "keep_linebreaks": False,
}


def _as_cli(values):
    argv = []
    for name, value in values.items():
        argv += [f"--{name}", str(value)]
    return argv


def test_every_upstream_argument_is_parsed():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        _as_cli(UPSTREAM_MODEL_ARGS) + _as_cli(UPSTREAM_DATA_ARGS) + ["--output_dir", "/tmp/out", "--use_cpu"]
    )
    assert {k: getattr(model_args, k) for k in UPSTREAM_MODEL_ARGS} == UPSTREAM_MODEL_ARGS
    assert {k: getattr(data_args, k) for k in UPSTREAM_DATA_ARGS} == UPSTREAM_DATA_ARGS
    assert training_args.output_dir == "/tmp/out"


def test_config_overrides_with_a_pretrained_model_is_refused():
    with pytest.raises(ValueError, match="config_overrides"):
        ModelArguments(model_name_or_path="m", config_overrides="n_embd=10")


def test_data_file_extension_is_checked():
    with pytest.raises(ValueError, match=r"\.csv, \.json or \.txt"):
        DataTrainingArguments(train_file="corpus.parquet")


def test_a_binary_data_file_is_named_before_loading(tmp_path):
    # The same check as the UTF-16 row of tests/bad_inputs.py's BAD_INPUTS, without starting ranks.
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 100)
    with pytest.raises(ValueError) as error:
        load_raw_datasets(DataTrainingArguments(train_file=str(binary)), ModelArguments())
    assert str(error.value) == \
        f"Data file {binary} is not UTF-8 text (invalid start byte): convert it to UTF-8 (e.g. with iconv)."


@pytest.mark.parametrize(
    "lengths, block_size, expected_blocks",
    [([8], 4, 2), ([3, 5], 4, 2), ([3], 4, 0), ([4, 4, 1], 4, 2), ([1] * 9, 3, 3)],
)
def test_group_texts_cuts_blocks_and_drops_the_remainder(lengths, block_size, expected_blocks):
    texts, start = [], 0
    for n in lengths:
        texts.append(list(range(start, start + n)))
        start += n
    examples = {"input_ids": texts, "attention_mask": [[1] * n for n in lengths]}
    result = group_texts(examples, block_size)
    assert len(result["input_ids"]) == expected_blocks
    flat = list(range(start))
    for i, block in enumerate(result["input_ids"]):
        assert block == flat[i * block_size : (i + 1) * block_size]
    assert result["labels"] == result["input_ids"]
    assert all(len(m) == block_size for m in result["attention_mask"])


def test_document_masking_refuses_a_model_that_cannot_take_the_document_mask(tmp_path, monkeypatch):
    # BLOOM builds its own mask from a padding mask (it calls attention through no registry, in transformers 4.51 and 5).
    train_file, _, tokenizer = embedded_default.prepare_default_corpus()
    small = tmp_path / "small.txt"
    small.write_text(Path(train_file).read_text()[:20000])
    with pytest.raises(UserError) as error:
        run_origin_main(monkeypatch, "--train_file", str(small), "--validation_file", str(small),
                        "--tokenizer_name", tokenizer, "--model_type", "bloom", "--config_overrides",
                        "hidden_size=32,n_layer=1,n_head=2", "--document_masking", "--block_size", "64",
                        "--output_dir", str(tmp_path / "out"), "--do_train")
    assert re.fullmatch(
        r"BloomForCausalLM with \w+ attention cannot take the document mask: --document_masking needs a model that "
        r"takes a 4D attention mask as it is \(Llama, Mistral, Qwen2, \.\.\.\) with eager or sdpa attention\.",
        str(error.value)), str(error.value)
