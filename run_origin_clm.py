#!/usr/bin/env python
"""Train a causal language model with the Hugging Face Trainer: the baseline, without context parallelism.

It takes the arguments of transformers' examples/pytorch/language-modeling/run_clm.py (v4.51.3) and behaves
like it: tokenize a text dataset, cut it into blocks of `block_size` tokens, train, evaluate (loss,
perplexity, token accuracy) and save. With no model and no dataset given it trains the embedded default
(embedded_default.py): a small Llama on Shakespeare, fully offline.

    torchrun --nproc_per_node 1 run_origin_clm.py --output_dir out --do_train --do_eval
"""

import gc
import json
import logging
import math
import os
import socket
import sys
import zipfile
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
import transformers
from accelerate.utils import DistributedType
from datasets import load_dataset
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from embedded_default import prepare_default_corpus, small_llama_config
from long_context import enable_memory_options

logger = logging.getLogger(__name__)

MODEL_TYPES = tuple(conf.model_type for conf in MODEL_FOR_CAUSAL_LM_MAPPING.keys())


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to train, from the Hub, a folder, or from scratch."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Checkpoint to start from. Leave unset to train a model from scratch."},
    )
    model_type: Optional[str] = field(
        default=None,
        metadata={"help": "Model type to build from scratch, one of: " + ", ".join(MODEL_TYPES)},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "Override config values when training from scratch, e.g. "
            "n_embd=10,resid_pdrop=0.2,scale_attn_weights=false,summary_type=cls_index"
        },
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config name or path, if not the same as model_name_or_path"}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as model_name_or_path"}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where to store models and data downloaded from the Hub"}
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer"}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version to use: a branch name, tag name or commit id"}
    )
    token: Optional[str] = field(
        default=None, metadata={"help": "Hub token for private models (default: the one from `huggingface-cli login`)"}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models defined on the Hub in their own modeling files (runs code from the Hub)"},
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "dtype to load the model in; 'auto' takes the checkpoint's own dtype",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    low_cpu_mem_usage: bool = field(
        default=False,
        metadata={"help": "Create the model as an empty shell and materialise it while loading the weights"},
    )
    tiled_mlp_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "Run each decoder layer's MLP over tiles of this many tokens of the sequence, forward and backward: "
            "less activation memory at long context, the same math (long_context.py)"
        },
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.config_name is not None or self.model_name_or_path is not None):
            raise ValueError("--config_overrides can't be used with --config_name or --model_name_or_path")


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on, and how to cut it into blocks."""

    dataset_name: Optional[str] = field(default=None, metadata={"help": "Dataset name on the Hub"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name"})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training text (.txt, .csv or .json)"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation text (.txt, .csv or .json)"})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many training blocks (for debugging or quick runs)"}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many evaluation blocks (for debugging or quick runs)"}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading it"})
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Tokens per training sample. Default: the model's maximum length, at most 1024."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo the cached preprocessing"})
    validation_split_percentage: Optional[int] = field(
        default=5, metadata={"help": "Percent of the training set used for evaluation when there is no validation split"}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes used for preprocessing"}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files"})
    text_sample_by: str = field(
        default="line",
        metadata={
            "help": "What one example (one document, for --document_masking) of a .txt file is: a line (as run_clm), "
            "a paragraph (text between blank lines) or the whole file (datasets' text loader's sample_by)",
            "choices": ["line", "paragraph", "document"],
        },
    )
    document_masking: bool = field(
        default=False,
        metadata={
            "help": "Pack documents (the dataset's examples) with a document mask: an end-of-text token after each, "
            "attention only within a document, position ids from 0 at each document start, and no token trained "
            "to predict the next document"
        },
    )

    def __post_init__(self):
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.split(".")[-1] not in ("csv", "json", "txt"):
                raise ValueError(f"--{name} must be a .csv, .json or .txt file, got {path}")
        if self.dataset_name is None and self.train_file is None and self.validation_file is not None:
            raise ValueError(
                "--validation_file was given without --train_file: give --train_file too, or neither to train on "
                "the embedded default."
            )


def load_raw_datasets(data_args, model_args):
    """A DatasetDict with 'train' and 'validation', from the Hub or from local files."""
    hub_kwargs = dict(cache_dir=model_args.cache_dir, token=model_args.token, streaming=data_args.streaming,
                      trust_remote_code=model_args.trust_remote_code)
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub_kwargs)
        source = (data_args.dataset_name, data_args.dataset_config_name)
        loader_kwargs = {}
    else:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        for path in data_files.values():
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
        extension = data_args.train_file.split(".")[-1]
        loader = "text" if extension == "txt" else extension
        loader_kwargs = {"keep_linebreaks": data_args.keep_linebreaks, "sample_by": data_args.text_sample_by} \
            if loader == "text" else {}
        raw = load_dataset(loader, data_files=data_files, **loader_kwargs, **hub_kwargs)
        source = (loader,)
        loader_kwargs["data_files"] = data_files
    if "validation" not in raw:
        pct = data_args.validation_split_percentage
        raw["validation"] = load_dataset(*source, split=f"train[:{pct}%]", **loader_kwargs, **hub_kwargs)
        raw["train"] = load_dataset(*source, split=f"train[{pct}%:]", **loader_kwargs, **hub_kwargs)
    return raw


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


def release_output_dir(training_args):
    if training_args.process_index == 0:
        (Path(training_args.output_dir) / "run.lock").unlink(missing_ok=True)


def tokenize_documents(tokenizer, texts):
    """--document_masking: the token ids of each text, closed by the tokenizer's end-of-text token. No attention_mask:
    the documents' mask comes from the position ids that group_texts adds."""
    documents = tokenizer(texts, return_attention_mask=False)["input_ids"]
    return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in documents]}


def group_texts(examples, block_size, document_masking=False):
    """Concatenate a batch of tokenized texts and cut it into blocks; the remainder that does not fill a block is dropped.

    With document_masking, each text is a document and each block gets position_ids that start at 0 at each document
    start and at the block's start (a document cut by the block border goes on as a new one: it cannot see its
    beginning), and the first token of each document is no target (label -100): nothing learns to predict a document
    from the end of the one before. Both scripts find the documents' starts where position_ids are 0."""
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = (len(concatenated["input_ids"]) // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    if document_masking:
        document_positions = list(chain(*(range(len(ids)) for ids in examples["input_ids"])))
        result["position_ids"] = []
        for i in range(0, total_length, block_size):
            positions = document_positions[i : i + block_size]
            first_start = positions.index(0) if 0 in positions else block_size
            result["position_ids"].append([p - positions[0] for p in positions[:first_start]] + positions[first_start:])
        result["labels"] = [
            [-100 if p == 0 else token for token, p in zip(ids, positions)]
            for ids, positions in zip(result["input_ids"], result["position_ids"])
        ]
    return result


def collate_with_document_mask(features, dtype):
    """default_data_collator, plus the blocks' document mask as a [batch, 1, seq, seq] additive attention mask, which
    the model's eager and SDPA attention take as it is: each token attends to itself and the earlier tokens of its
    own document. Documents start where position_ids are 0 (see group_texts)."""
    batch = default_data_collator(features)
    document_ids = (batch["position_ids"] == 0).cumsum(dim=1)
    seq_len = document_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = (document_ids[:, None, :, None] == document_ids[:, None, None, :]) & causal
    batch["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return batch


def main():
    # Arguments: from the command line, or from one .json file given as the only argument.
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger(enable_memory_options.__module__).setLevel(log_level)  # it logs the memory options it enables
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_rank}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16 or training_args.bf16}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    if training_args.do_train:
        if training_args.resume_from_checkpoint is not None:
            check_checkpoint(training_args.resume_from_checkpoint)
        claim_output_dir(training_args)

    set_seed(training_args.seed)

    # The embedded default fills in only what is not given: Shakespeare when no dataset is given, and the tokenizer
    # trained on it (a byte-level BPE, which reads any text) when no model and no tokenizer are given.
    default_data = data_args.dataset_name is None and data_args.train_file is None
    default_tokenizer = model_args.model_name_or_path is None and model_args.tokenizer_name is None
    if default_data or default_tokenizer:
        with training_args.main_process_first(desc="preparing the embedded default corpus"):
            train_file, validation_file, tokenizer_dir = prepare_default_corpus()
        if default_data:
            data_args.train_file, data_args.validation_file = train_file, validation_file
            logger.info(f"No dataset given: training on the embedded default's text, {train_file}.")
        if default_tokenizer:
            model_args.tokenizer_name = tokenizer_dir
            logger.info(f"No model or tokenizer given: using the embedded default's tokenizer, {tokenizer_dir}.")
    raw_datasets = load_raw_datasets(data_args, model_args)

    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, use_fast=model_args.use_fast_tokenizer, **hub_kwargs)
    if data_args.document_masking and tokenizer.eos_token_id is None:
        raise ValueError(
            f"--document_masking ends every document with the tokenizer's end-of-text token, and this "
            f"{type(tokenizer).__name__} has none: use a tokenizer with an eos_token, or drop --document_masking."
        )

    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, **hub_kwargs)
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs)
    elif model_args.model_type:
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("You are instantiating a new config instance from scratch.")
    else:
        config = small_llama_config(tokenizer)
        logger.info("No model given: training the embedded default's small Llama, built from a config.")
    if model_args.config_overrides is not None:
        logger.info(f"Overriding config: {model_args.config_overrides}")
        config.update_from_string(model_args.config_overrides)
        logger.info(f"New config: {config}")

    if model_args.model_name_or_path:
        # Unset means float32 on both stacks (transformers 5 would take the checkpoint's own dtype, as for "auto").
        torch_dtype = model_args.torch_dtype or "float32"
        torch_dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            from_tf=bool(".ckpt" in model_args.model_name_or_path),
            config=config,
            torch_dtype=torch_dtype,
            low_cpu_mem_usage=model_args.low_cpu_mem_usage,
            **hub_kwargs,
        )
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
        logger.info(f"Training new model from scratch - Total size={n_params / 1e6:.2f}M params")

    # The document mask goes to the model as a 4D mask (collate_with_document_mask): only models that take one as it
    # is, with eager or SDPA attention. transformers 4.51's build their mask in _update_causal_mask, which passes a 4D
    # mask through; transformers 5's that call attention through its registry build it in masking_utils, which does.
    if data_args.document_masking and not (
        model.config._attn_implementation in ("eager", "sdpa") and hasattr(model, "get_decoder")
        and (hasattr(model.get_decoder(), "_update_causal_mask") or int(transformers.__version__.split(".")[0]) >= 5
             and getattr(model, "_supports_attention_backend", False))
    ):
        raise ValueError(
            f"{type(model).__name__} with {model.config._attn_implementation} attention cannot take the document "
            "mask: --document_masking needs a model that takes a 4D attention mask as it is (Llama, Mistral, "
            "Qwen2, ...) with eager or sdpa attention."
        )

    # Grow the embeddings only when the tokenizer has more tokens: shrinking would break loaded weights.
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))

    # Checked before tokenizing, which can take long on a large dataset.
    max_pos_embeddings = getattr(config, "max_position_embeddings", None)
    if data_args.block_size is None:
        block_size = min(tokenizer.model_max_length, 1024)
        if max_pos_embeddings is not None:
            block_size = min(block_size, max_pos_embeddings)
        logger.info(f"Using block_size={block_size}; pass --block_size to change it.")
    else:
        block_size = data_args.block_size
    if block_size <= 0:
        raise ValueError(
            f"--block_size must be positive, got {block_size}: pass a positive --block_size or leave it unset."
        )
    if max_pos_embeddings is not None and block_size > max_pos_embeddings:
        raise ValueError(
            f"--block_size {block_size} is larger than the model's max_position_embeddings ({max_pos_embeddings}): "
            "pass a smaller --block_size, or raise max_position_embeddings with --config_overrides."
        )

    # Tokenize every text column, then concatenate and cut into blocks of block_size tokens.
    column_names = list(raw_datasets["train" if training_args.do_train else "validation"].features)
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        if data_args.document_masking:
            return tokenize_documents(tokenizer, examples[text_column_name])
        return tokenizer(examples[text_column_name])

    with training_args.main_process_first(desc="dataset map tokenization"):
        map_kwargs = {} if data_args.streaming else {
            "num_proc": data_args.preprocessing_num_workers,
            "load_from_cache_file": not data_args.overwrite_cache,
            "desc": "Running tokenizer on dataset",
        }
        tokenized_datasets = raw_datasets.map(
            tokenize_function, batched=True, remove_columns=column_names, **map_kwargs
        )

    # Batches of 1000 texts are grouped together: each batch drops its own remainder.
    with training_args.main_process_first(desc="grouping texts together"):
        map_kwargs = {} if data_args.streaming else {
            "num_proc": data_args.preprocessing_num_workers,
            "load_from_cache_file": not data_args.overwrite_cache,
            "desc": f"Grouping texts in chunks of {block_size}",
        }
        lm_datasets = tokenized_datasets.map(
            partial(group_texts, block_size=block_size, document_masking=data_args.document_masking),
            batched=True,
            **map_kwargs,
        )

    def checked_split(split, max_samples):
        dataset = lm_datasets[split]
        if max_samples is not None:
            dataset = dataset.take(max_samples) if data_args.streaming else dataset.select(
                range(min(len(dataset), max_samples))
            )
        if not data_args.streaming and len(dataset) == 0:
            raise ValueError(
                f"The {split} text is shorter than one block of {block_size} tokens: "
                "give more text or a smaller --block_size."
            )
        return dataset

    if training_args.do_train:
        train_dataset = checked_split("train", data_args.max_train_samples)
    if training_args.do_eval:
        eval_dataset = checked_split("validation", data_args.max_eval_samples)

        def preprocess_logits_for_metrics(logits, labels):
            if isinstance(logits, tuple):
                logits = logits[0]  # some models return extra tensors (past key values)
            return logits.argmax(dim=-1)

        def compute_metrics(eval_preds):
            # Token accuracy, computed here: evaluate.load("accuracy") would need the Hub.
            preds, labels = eval_preds
            labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
            valid = labels != -100
            return {"accuracy": float(np.mean(preds[valid] == labels[valid]))}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=partial(collate_with_document_mask, dtype=model.dtype) if data_args.document_masking
        else default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )
    if training_args.fsdp and trainer.accelerator.distributed_type != DistributedType.FSDP:
        raise ValueError(
            "--fsdp: accelerate runs FSDP on GPUs only, and would train these CPU processes with DDP instead, the "
            "whole model state on each: drop --fsdp here (FSDP=1 for the launchers), or run on GPUs."
        )
    # Checkpointed layer inputs in CPU memory, MLP in tiles: options that save activation memory (long_context.py).
    enable_memory_options(trainer, model_args.tiled_mlp_tokens)

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if trainer.is_fsdp_enabled and "SHARDED" in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
            # save_model leaves FSDP's sharded weights to the checkpoints (the only kind accelerate 1.6's FSDP2 takes).
            # The final model is saved whole, as without FSDP: gathered a tensor at a time into rank 0's CPU memory.
            state_dict = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
            if training_args.should_save:
                trainer._save(training_args.output_dir, state_dict=state_dict)  # as save_model: with the tokenizer
        else:
            trainer.save_model()  # also saves the tokenizer

        metrics = train_result.metrics
        max_train_samples = data_args.max_train_samples or len(train_dataset)
        metrics["train_samples"] = min(max_train_samples, len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        max_eval_samples = data_args.max_eval_samples or len(eval_dataset)
        metrics["eval_samples"] = min(max_eval_samples, len(eval_dataset))
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        kwargs["dataset"] = data_args.dataset_name if data_args.dataset_config_name is None else \
            f"{data_args.dataset_name} {data_args.dataset_config_name}"
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)

    # Join the process groups' threads before the interpreter exits. A gloo worker still alive then can be
    # releasing its last collective, whose saved state holds Python objects: it must take the GIL, CPython ends it
    # instead, and the process aborts (SIGABRT, "terminate called without an active exception") after a finished
    # run. A group's threads are joined when its last reference goes, and that must be a Python group object, which
    # lets go of the GIL while joining: dropped by the Trainer's DDP reducer or by torch's registry, the join would
    # hold the GIL that the worker waits for. So: keep the groups, free the Trainer (its reference cycles hold them),
    # destroy the groups, then let go of them.
    groups = list(torch.distributed.distributed_c10d._world.pg_map) if torch.distributed.is_initialized() else []
    del trainer
    gc.collect()
    if groups:
        torch.distributed.destroy_process_group()
    del groups
    if training_args.do_train:
        release_output_dir(training_args)


if __name__ == "__main__":
    main()
