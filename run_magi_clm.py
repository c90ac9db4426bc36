#!/usr/bin/env python
"""Train a causal language model with the Hugging Face Trainer and context parallelism through MagiAttention.

This is run_origin_clm.py plus the context-parallel (CP) patch: every rank of a CP group holds a slice of
each sequence, attention runs across the slices through MagiAttention's API, and each rank computes the
loss of its own tokens. `diff -u run_origin_clm.py run_magi_clm.py` shows the patch.

It takes the arguments of transformers' examples/pytorch/language-modeling/run_clm.py (v4.51.3) and behaves
like it: tokenize a text dataset, cut it into blocks of `block_size` tokens, train, evaluate (loss,
perplexity, token accuracy) and save. With no model and no dataset given it trains the embedded default
(embedded_default.py): a small Llama on Shakespeare, fully offline.

    torchrun --nproc_per_node 2 run_magi_clm.py --cp_size 2 --output_dir out --do_train --do_eval
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
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, recursively_apply
from datasets import load_dataset
from einops import rearrange
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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from embedded_default import prepare_default_corpus, small_llama_config
from long_context import check_memory_options, enable_memory_options
from magi_utils import (
    attention_heads,
    check_fsdp,
    check_model_takes_magi_attention,
    check_supported_versions,
    cp_device_mesh,
    default_chunk_size,
    magi_api,
    skip_causal_mask,
)
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


@dataclass
class MagiArguments:
    """Context parallelism: how many ranks share one sequence."""

    cp_size: int = field(
        default=1, metadata={"help": "Ranks in a context-parallel group; must divide the number of processes."}
    )

    def __post_init__(self):
        if self.cp_size < 1:
            raise UserError(f"--cp_size must be at least 1, got {self.cp_size}: pass --cp_size 1 (no CP) or more.")


def magi_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, magi_attn_key=None,
                           **kwargs):
    """Attention of this rank's queries over the whole sequence. q/k/v come as [1, heads, local_tokens, head_dim],
    after RoPE; attention_mask is None: the key carries the mask."""
    if dropout != 0.0:
        raise ValueError("MagiAttention has no attention dropout: set the model's attention_dropout to 0.")
    q, k, v = (rearrange(t, "1 h s d -> s h d") for t in (query, key, value))
    if torch.is_autocast_enabled(query.device.type):
        # As SDPA does under autocast (--bf16): RoPE with float32 cos/sin hands over float32 q and k, and the fast
        # attention kernels take bf16/fp16 only (with float32 q/k the portable backend falls back to FlexAttention).
        q, k, v = (t.to(torch.get_autocast_dtype(query.device.type)) for t in (q, k, v))
    out, _ = magi_api.calc_attn(q, k, v, magi_attn_key, softmax_scale=scaling)
    return rearrange(out, "s h d -> 1 s h d"), None


ALL_ATTENTION_FUNCTIONS.register("Magi_Attention", magi_attention_forward)


class AllReduceSum(torch.autograd.Function):
    """Sum over a process group, whose backward sums the gradients over the group too. As
    torch.distributed.nn.functional.all_reduce, which is deprecated; the functional collective that replaces it
    is differentiable only in recent torch versions."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad_output):
        grad_output = grad_output.clone()
        dist.all_reduce(grad_output, group=ctx.group)
        return grad_output, None


class MagiAccelerator(Accelerator):
    """Ranks r * cp_size ... (r + 1) * cp_size - 1 form one CP group: one data-parallel replica. Under FSDP2 the model
    state is sharded over all processes, the ranks of a CP group included (they hold the same weights): fully_shard's
    default mesh, all processes in one dimension, is the (dp, cp) mesh flattened."""

    def __init__(self, *args, cp_size, **kwargs):
        super().__init__(*args, **kwargs)
        self.cp_size = cp_size
        self.cp_mesh, self.cp_group = cp_device_mesh(self.device.type, cp_size, self.num_processes)

    def _prepare_device_mesh(self):
        # The data loader reads the mesh: the ranks of a CP group get the same batches.
        return self.cp_mesh if self.cp_size > 1 else super()._prepare_device_mesh()

    def prepare_model(self, model, *args, **kwargs):
        # DDP sums the CP group's gradients (see MagiTrainer.compute_loss). With its buckets as the gradients' storage
        # it holds one copy of them, not two: 2.3 GiB a GPU less for a 1.2B-parameter model in bf16.
        self.ddp_handler = self.ddp_handler or DistributedDataParallelKwargs()
        self.ddp_handler.gradient_as_bucket_view = True
        return super().prepare_model(model, *args, **kwargs)

    def gather(self, tensor):
        # The ranks of a CP group hold the same samples: count them once (token counts, eval metrics).
        def first_of_each_cp_group(t):
            return t.unflatten(0, (self.num_processes // self.cp_size, self.cp_size, -1))[:, 0].flatten(0, 1)

        return recursively_apply(first_of_each_cp_group, super().gather(tensor))


class MagiTrainer(Trainer):
    """Each rank feeds the model its slice of the batch's tokens and computes the loss of those tokens."""

    def __init__(self, *args, cp_size, **kwargs):
        self.cp_size = cp_size
        self.magi_attn_key = None
        self.logged_plan_shape = None
        super().__init__(*args, **kwargs)
        if self.preprocess_logits_for_metrics is not None:
            # It puts this rank's predictions back in order: it takes the key of the batch as a third argument.
            preprocess = self.preprocess_logits_for_metrics
            self.preprocess_logits_for_metrics = lambda logits, labels: preprocess(logits, labels, self.magi_attn_key)

    def create_accelerator_and_postprocess(self):
        # The Trainer builds its Accelerator in here, from the name Accelerator in its module, and has no argument
        # to pass a subclass: have that name build ours for the call.
        trainer_module = sys.modules[Trainer.__module__]
        trainer_module.Accelerator = partial(MagiAccelerator, cp_size=self.cp_size)
        try:
            super().create_accelerator_and_postprocess()
        finally:
            trainer_module.Accelerator = Accelerator

    def global_batch(self, total_train_batch_size):
        # The Trainer multiplies the batch by every process, where a CP group holds one batch: the samples counted in
        # the speed metrics (on transformers 5 also its "Total train batch size" log line; 4.51 logs its own figure).
        if self.cp_size > 1:
            logger.info(f"Global batch: {total_train_batch_size // self.cp_size} samples a step")
        return total_train_batch_size // self.cp_size

    def set_initial_training_values(self, args, dataloader, total_train_batch_size=None):
        # transformers 4.51 hands the Trainer's figure in here, and logs it next ("Total train batch size"): the log
        # line gets the true one too. transformers 5 computes it in get_total_train_batch_size.
        if total_train_batch_size is None:
            return super().set_initial_training_values(args, dataloader)
        global_batch = self.global_batch(total_train_batch_size)
        trainer_log = logging.getLogger(Trainer.__module__)

        def log_the_true_figure(record):
            if str(record.msg).lstrip().startswith("Total train batch size"):
                record.msg = record.msg.replace(f"= {total_train_batch_size:,}", f"= {global_batch:,}")
                trainer_log.removeFilter(log_the_true_figure)
            return True

        trainer_log.addFilter(log_the_true_figure)
        return super().set_initial_training_values(args, dataloader, global_batch)

    def get_total_train_batch_size(self, args):
        return self.global_batch(super().get_total_train_batch_size(args))

    def floating_point_ops(self, inputs):
        # Every rank of a CP group is handed the whole batch and computes a cp_size-th of it; the Trainer sums the
        # ranks' figures into total_flos.
        return super().floating_point_ops(inputs) / self.cp_size

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        if "attention_mask" in inputs and not inputs["attention_mask"].all():
            raise ValueError("Padded batches are not supported with context parallelism: use full blocks of text.")
        batch_size, seq_len = input_ids.shape
        config = self.model.config

        # Each sample is its own causal sequence in one flattened token stream, cut into chunks over the CP group; with
        # --document_masking each document is, and the batch has position ids that start at 0 at each (see group_texts).
        if "position_ids" in inputs:
            position_ids = inputs["position_ids"].flatten()
        else:
            position_ids = torch.arange(seq_len, device=input_ids.device).repeat(batch_size)
        cu_seqlens = F.pad((position_ids == 0).nonzero().flatten(), (0, 1), value=position_ids.numel()).to(torch.int32)
        chunk_size = default_chunk_size(batch_size * seq_len, self.cp_size)
        num_heads_q, num_heads_kv = attention_heads(config)
        key = magi_api.magi_attn_varlen_key(
            cu_seqlens,
            cu_seqlens,
            num_heads_q=num_heads_q,
            num_heads_kv=num_heads_kv,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            pad_size=magi_api.compute_pad_size(batch_size * seq_len, self.cp_size, chunk_size),
            cp_group_or_mesh=self.accelerator.cp_group,
            causal=True,
            chunk_size=chunk_size,
        )
        # A plan of a new shape; not one a batch: with --document_masking each batch has its own.
        if (batch_size, seq_len) != self.logged_plan_shape:
            logger.info(f"CP plan for {batch_size} samples x {seq_len} tokens, {len(cu_seqlens) - 1} causal sequences: "
                        f"chunks of {chunk_size} tokens over {self.cp_size} ranks")
            self.logged_plan_shape = batch_size, seq_len
        self.magi_attn_key = key
        # Shift the labels before dispatch, so that each rank holds the targets of its own tokens.
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        return {
            "input_ids": magi_api.dispatch(input_ids.flatten(), self.magi_attn_key).unsqueeze(0),
            "position_ids": magi_api.dispatch(position_ids, self.magi_attn_key).unsqueeze(0),
            "magi_attn_key": self.magi_attn_key,
            # Not named "shift_labels": transformers 5 would count an eval batch's tokens from that key, this rank's.
            "local_shift_labels": magi_api.dispatch(
                shift_labels.flatten(), self.magi_attn_key, pad_value=-100
            ).unsqueeze(0),
            "num_label_tokens": (shift_labels != -100).sum(),
            "labels": labels,  # the whole batch's, for the eval metrics
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The model computes the loss of this rank's tokens (with --use_liger_kernel, without their logits) over
        # the whole batch's token count, so that the losses of a CP group add up to the baseline's loss.
        # num_items_in_batch counts each CP group once (see MagiAccelerator.gather).
        outputs = model(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            magi_attn_key=inputs["magi_attn_key"],
            labels=inputs["local_shift_labels"],
            shift_labels=inputs["local_shift_labels"],
            num_items_in_batch=inputs["num_label_tokens"] if num_items_in_batch is None else num_items_in_batch,
        )
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss *= self.accelerator.num_processes // self.cp_size  # the baseline multiplies by its world size
        # Sum over the CP group: every rank reports the baseline's loss, and since the backward of this all-reduce
        # sums the CP group's gradients (cp_size x this rank's), DDP's average over dp x cp ranks gives the
        # baseline's gradient: the Trainer's training_step needs no change. FSDP2's reduce-scatter averages over all
        # processes as well (MagiAccelerator).
        loss = AllReduceSum.apply(loss, self.accelerator.cp_group)
        return (loss, outputs) if return_outputs else loss


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


def main():
    # Arguments: from the command line, or from one .json file given as the only argument.
    parser = ArgumentParser((MagiArguments, ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        magi_args, model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        magi_args, model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    # Fail on every rank before any work, rather than hang in a collective later.
    check_supported_versions()
    # Not local_rank: transformers sets it to 0 without torchrun. The process group reads RANK from the environment.
    if "RANK" not in os.environ:
        raise UserError("run_magi_clm.py runs under torchrun, even for one process: use run_magi_clm.sh.")
    if data_args.streaming and magi_args.cp_size > 1:
        raise UserError("--streaming is not supported with --cp_size > 1: drop --streaming (map-style datasets only).")
    if training_args.world_size % magi_args.cp_size != 0:
        raise UserError(
            f"--cp_size {magi_args.cp_size} does not divide the number of processes ({training_args.world_size}): "
            "launch a multiple of cp_size processes or change --cp_size."
        )
    check_fsdp(training_args)

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
    logging.getLogger(magi_api.__name__).setLevel(log_level)  # the backend logs which attention kernel runs
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

    data_parallel_size = training_args.world_size // magi_args.cp_size
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
    config._attn_implementation = "Magi_Attention"
    logger.info(f"Context parallelism over {magi_args.cp_size} ranks, attention by {magi_api.__name__}")

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

    check_model_takes_magi_attention(model, config._attn_implementation)
    skip_causal_mask(model)

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

        def preprocess_logits_for_metrics(logits, labels, magi_attn_key):
            if isinstance(logits, tuple):
                logits = logits[0]  # some models return extra tensors (past key values)
            # This rank's predictions, put back in order for the whole batch.
            return magi_api.undispatch(logits.argmax(dim=-1).flatten(), magi_attn_key).view_as(labels)

        def compute_metrics(eval_preds):
            # Token accuracy, computed here: evaluate.load("accuracy") would need the Hub.
            preds, labels = eval_preds
            labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
            valid = labels != -100
            return {"accuracy": float(np.mean(preds[valid] == labels[valid]))}

    trainer = MagiTrainer(
        cp_size=magi_args.cp_size,
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,  # with --document_masking too: the MagiAttention key carries the mask
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
