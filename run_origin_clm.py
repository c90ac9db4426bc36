#!/usr/bin/env python
"""Train a causal language model with the Hugging Face Trainer: the baseline, without context parallelism.

It takes the arguments of transformers' examples/pytorch/language-modeling/run_clm.py (v4.51.3) and behaves
like it: tokenize a text dataset, cut it into blocks of `block_size` tokens, train, evaluate (loss,
perplexity, token accuracy) and save. With no model and no dataset given it trains the embedded default
(embedded_default.py): a small Llama on Shakespeare, fully offline.

    torchrun --nproc_per_node 1 run_origin_clm.py --output_dir out --do_train --do_eval
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Optional

import datasets
import numpy as np
import torch
import transformers
from datasets import load_dataset
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from embedded_default import prepare_default_corpus, small_llama_config
from long_context import check_memory_options, enable_memory_options
from run_guards import (
    ArgumentParser,
    RunRecord,
    UserError,
    check_arguments,
    check_checkpoint,
    check_data_files,
    check_fsdp_took_effect,
    check_validation_split,
    claim_output_dir,
    release_output_dir,
    run_definition,
    run_main,
    save_model,
    text_column,
    train_loss_of_the_run,
    writes_explained,
)

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
            raise UserError("--config_overrides can't be used with --config_name or --model_name_or_path")


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
                raise UserError(f"--{name} must be a .csv, .json or .txt file, got {path}")
        if self.dataset_name is None and self.train_file is None and self.validation_file is not None:
            raise UserError(
                "--validation_file was given without --train_file: give --train_file too, or neither to train on "
                "the embedded default."
            )
        if self.block_size is not None and self.block_size < 2:
            raise UserError(
                f"--block_size {self.block_size} trains nothing (a block's first token is no target, so a block needs "
                "2 tokens or more): pass a --block_size of 2 or more, or leave it unset."
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
        check_data_files(data_files.values())
        extension = data_args.train_file.split(".")[-1]
        loader = "text" if extension == "txt" else extension
        loader_kwargs = {"keep_linebreaks": data_args.keep_linebreaks, "sample_by": data_args.text_sample_by} \
            if loader == "text" else {}
        raw = load_dataset(loader, data_files=data_files, **loader_kwargs, **hub_kwargs)
        source = (loader,)
        loader_kwargs["data_files"] = data_files
    if "validation" not in raw:
        pct = data_args.validation_split_percentage
        if not data_args.streaming:
            check_validation_split(raw["train"], pct, data_args.train_file or data_args.dataset_name)
        raw["validation"] = load_dataset(*source, split=f"train[:{pct}%]", **loader_kwargs, **hub_kwargs)
        raw["train"] = load_dataset(*source, split=f"train[{pct}%:]", **loader_kwargs, **hub_kwargs)
    return raw


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
    parser = ArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
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
    logging.getLogger(claim_output_dir.__module__).setLevel(log_level)  # it logs how the run starts
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16 or training_args.bf16}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    data_parallel_size = training_args.world_size
    # Before any work, on every rank: the arguments, the checkpoint to resume from, the output folder.
    check_arguments(model_args, data_args, training_args, data_parallel_size)
    check_memory_options(training_args, model_args.tiled_mlp_tokens)
    if training_args.do_train:
        # What defines this run: kept in its checkpoints, and the same in a resume.
        definition = run_definition(model_args, data_args, training_args, data_parallel_size)
        resumed = None  # (checkpoint, its trainer state)
        if training_args.resume_from_checkpoint is not None:
            checkpoint_state = check_checkpoint(training_args, definition)
            resumed = training_args.resume_from_checkpoint, checkpoint_state
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
        raise UserError(
            f"--document_masking ends every document with the tokenizer's end-of-text token, and the tokenizer "
            f"{tokenizer_name} has none: use a tokenizer with an eos_token, or drop --document_masking."
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
        if training_args.resume_from_checkpoint is None:
            logger.info(f"Training new model from scratch - Total size={n_params / 1e6:.2f}M params")
        else:
            logger.info(f"Built a model of {n_params / 1e6:.2f}M params for the checkpoint's weights")

    # The document mask goes to the model as a 4D mask (collate_with_document_mask): only models that take one as it
    # is, with eager or SDPA attention. transformers 4.51's build their mask in _update_causal_mask, which passes a 4D
    # mask through; transformers 5's that call attention through its registry build it in masking_utils, which does.
    if data_args.document_masking and not (
        model.config._attn_implementation in ("eager", "sdpa") and hasattr(model, "get_decoder")
        and (hasattr(model.get_decoder(), "_update_causal_mask") or int(transformers.__version__.split(".")[0]) >= 5
             and getattr(model, "_supports_attention_backend", False))
    ):
        raise UserError(
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
    if max_pos_embeddings is not None and block_size > max_pos_embeddings:
        raise UserError(
            f"--block_size {block_size} is larger than the model's max_position_embeddings ({max_pos_embeddings}): "
            "pass a smaller --block_size, or raise max_position_embeddings with --config_overrides."
        )

    # Tokenize every text column, then concatenate and cut into blocks of block_size tokens.
    column_names = list(raw_datasets["train" if training_args.do_train else "validation"].features)
    text_column_name = text_column(raw_datasets, data_args.train_file or data_args.dataset_name)

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
            raise UserError(
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
        # The run's definition, kept in each checkpoint; before the progress bar's callback, which would draw first.
        callbacks=[RunRecord(definition, resumed)] if training_args.do_train else None,
    )
    check_fsdp_took_effect(trainer)
    # Checkpointed layer inputs in CPU memory, MLP in tiles: options that save activation memory (long_context.py).
    enable_memory_options(trainer, model_args.tiled_mlp_tokens)

    if training_args.do_train:
        with writes_explained(training_args.output_dir):
            train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
            save_model(trainer)  # also saves the tokenizer

        metrics = train_result.metrics
        if resumed is not None:
            train_loss_of_the_run(metrics, trainer.state, resumed[1]["global_step"])
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

    release_output_dir()


if __name__ == "__main__":
    run_main(main)
