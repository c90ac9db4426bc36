"""The memory options of long_context.py (both scripts): checkpointed layer inputs offloaded to CPU memory, attention
outputs kept for the recomputation, the MLP in sequence tiles. They move, keep and split work without changing what
is computed: a tiny Llama (SDPA attention, as run_origin_clm.py's) trained by the Trainer on CPU with each option
against without, step by step. (tests/test_cp_exactness.py runs them under CP, tests/test_magi_attention_function.py
keeps calc_attn's outputs.)"""

import contextlib
import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from packaging import version
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

import long_context
from long_context import TiledMLP, enable_memory_options

LAYERS, HIDDEN, TOKENS, BATCH, HEADS, STEPS = 2, 32, 48, 2, 4, 3
SDPA_KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"  # SDPA's kernel on CPU, in float32


class CountOperators(TorchDispatchMode):
    """Counts the operators that run, by name."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.name()] = self.calls.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))


def train(tmp_path, tiled_mlp_tokens=None, mlp_lengths=None, operators=None, attn_implementation="sdpa",
          **training_args):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=TOKENS)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    if mlp_lengths is not None:  # records the sequence length that each MLP call sees
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_hook(lambda module, inputs, out: mlp_lengths.add(inputs[0].shape[-2]))
    ids = torch.randint(0, 64, (8, TOKENS), generator=torch.Generator().manual_seed(1)).tolist()
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, **training_args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids],
                      data_collator=default_data_collator)
    enable_memory_options(trainer, tiled_mlp_tokens)
    with operators or contextlib.nullcontext():
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(run, reference):
    """Same losses and parameters up to float32 rounding (the tiles sum the weights' gradients in another order)."""
    assert run[0] == pytest.approx(reference[0], rel=1e-5)
    for name, param in reference[1].items():
        assert (run[1][name] - param).norm() <= 1e-5 * param.norm(), name


@pytest.fixture
def saved_on_cpu(monkeypatch):
    """Records the shapes of the tensors that CPUOffload copies to CPU memory (the layer inputs, the kept attention
    outputs); for each one the backward takes, whether it was copied back before the backward asked for it, and how
    much is then on its way back (in sizes of the largest tensor saved)."""
    saved = SimpleNamespace(shapes=[], came_back_ahead=[], tensors_ahead=[])
    pack, unpack = long_context.CPUOffload.pack, long_context.CPUOffload.unpack

    def recording_pack(self, tensor):
        saved.shapes.append(tuple(tensor.shape))
        return pack(self, tensor)

    def recording_unpack(self, copy):
        saved.came_back_ahead.append(copy.on_device is not None)
        tensor = unpack(self, copy)
        saved.tensors_ahead.append(self.bytes_ahead / self.largest_saved)
        return tensor

    monkeypatch.setattr(long_context.CPUOffload, "pack", recording_pack)
    monkeypatch.setattr(long_context.CPUOffload, "unpack", recording_unpack)
    return saved


def assert_copied_back_ahead(saved):
    """After the first step (which records the order the backward takes the copies in), each backward asks for its
    first copy before any is on its way back; every other one has come back ahead of the backward's need (on a GPU,
    beside the computation), and less than twice the largest tensor's bytes are ever on their way back."""
    per_step = len(saved.came_back_ahead) // STEPS
    assert saved.came_back_ahead[per_step:] == ([False] + [True] * (per_step - 1)) * (STEPS - 1)
    assert 0 < max(saved.tensors_ahead) < 2


def test_offloading_the_checkpointed_layer_inputs_trains_alike(tmp_path, saved_on_cpu):
    reference = train(tmp_path / "reference", gradient_checkpointing=True)
    assert saved_on_cpu.shapes == []
    offloaded = train(tmp_path / "offload", gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"offload": True})
    # Every layer's input went through the offload, every step; nothing of the size of the MLP's activations did.
    assert saved_on_cpu.shapes.count((BATCH, TOKENS, HIDDEN)) >= LAYERS * 3
    assert max(s[-1] for s in saved_on_cpu.shapes if len(s) == 3) == HIDDEN
    assert_copied_back_ahead(saved_on_cpu)
    assert_same(offloaded, reference)


def test_kept_attention_outputs_spare_the_recomputation_the_kernel_and_train_alike(tmp_path, saved_on_cpu):
    reference_operators = CountOperators()
    reference = train(tmp_path / "reference", gradient_checkpointing=True, operators=reference_operators)
    # Checkpointing runs each layer's attention kernel twice a step: in the forward and in the recomputation.
    assert reference_operators.calls[SDPA_KERNEL] == 2 * LAYERS * STEPS
    for layers_kept in (1, True):
        operators = CountOperators()
        kept = train(tmp_path / f"keep{layers_kept}", gradient_checkpointing=True, operators=operators,
                     gradient_checkpointing_kwargs={"keep_attention_outputs": layers_kept})
        recomputed = LAYERS - (LAYERS if layers_kept is True else layers_kept)
        assert operators.calls[SDPA_KERNEL] == (LAYERS + recomputed) * STEPS
        assert operators.calls[SDPA_KERNEL + "_backward"] == LAYERS * STEPS
        assert kept[0] == reference[0]  # the same operators on the same inputs: the same numbers
        for name, param in reference[1].items():
            assert torch.equal(kept[1][name], param), name
    # With the offload, the kept outputs wait in CPU memory as the layer inputs do: SDPA's out is [batch, heads,
    # tokens, head_dim], its lse [batch, heads, tokens].
    assert saved_on_cpu.shapes == []
    offloaded = train(tmp_path / "offload", gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"offload": True, "keep_attention_outputs": True})
    assert saved_on_cpu.shapes.count((BATCH, HEADS, TOKENS, HIDDEN // HEADS)) == LAYERS * STEPS
    assert saved_on_cpu.shapes.count((BATCH, HEADS, TOKENS)) == LAYERS * STEPS
    assert_copied_back_ahead(saved_on_cpu)
    assert_same(offloaded, reference)


def test_offloaded_attention_outputs_come_back_as_the_kernel_laid_them_out():
    # SDPA's out is [batch, heads, tokens, d] over memory in [batch, tokens, heads, d] order; cuDNN's backward computes
    # wrong gradients from a contiguous copy of it (found on an H200), so the copy in CPU memory keeps the strides.
    keep_side, reuse_side = long_context.KeepAttentionOutputs(1, offload=long_context.CPUOffload(1))()
    q = torch.randn(1, TOKENS, HEADS, 8).transpose(1, 2)
    with keep_side:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True)
    with reuse_side:
        kept_out, kept_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True)
    assert not out.is_contiguous()
    for kept, computed in ((kept_out, out), (kept_lse, lse)):
        assert kept.stride() == computed.stride() and torch.equal(kept, computed)
        assert kept.data_ptr() != computed.data_ptr()  # a copy, not the forward's tensor


def test_keeping_attention_outputs_says_when_there_is_no_kernel_to_keep(tmp_path, caplog):
    # Eager attention is matmuls and a softmax: no kernel whose outputs stand for the attention.
    with caplog.at_level(logging.WARNING, logger="long_context"):
        train(tmp_path, attn_implementation="eager", gradient_checkpointing=True,
              gradient_checkpointing_kwargs={"keep_attention_outputs": True})
    assert f"{LAYERS} of {LAYERS} checkpointed layers ran no attention kernel whose outputs can be kept" in caplog.text


def test_the_mlp_in_tiles_trains_alike(tmp_path):
    reference = train(tmp_path / "reference")
    # 20 does not divide 48: tiles of 20, 20 and 8 tokens; with checkpointing, the tiles run inside the recompute.
    for gradient_checkpointing in (False, True):
        lengths = set()
        tiled = train(tmp_path / f"tiled{gradient_checkpointing}", tiled_mlp_tokens=20, mlp_lengths=lengths,
                      gradient_checkpointing=gradient_checkpointing)
        assert lengths == {20, 8}
        assert_same(tiled, reference)


def test_the_tiles_recompute_under_the_forwards_autocast():
    calls = []
    linear = torch.nn.Linear(8, 8)

    def forward(x):
        calls.append((x.shape[-2], torch.is_autocast_enabled("cpu")))
        return linear(x)

    x = torch.randn(1, 10, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TiledMLP.apply(forward, 4, x, linear.weight, linear.bias)
    out.float().sum().backward()
    assert calls == [(4, True), (4, True), (2, True)] * 2  # forward, then again in the backward
    assert out.dtype == torch.bfloat16 and linear.weight.grad.dtype == torch.float32


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="add --gradient_checkpointing"):
        train(tmp_path / "a", gradient_checkpointing_kwargs={"offload": True})
    with pytest.raises(ValueError, match="--tiled_mlp_tokens must be a positive number"):
        train(tmp_path / "b", tiled_mlp_tokens=0)
    with pytest.raises(ValueError, match="add --gradient_checkpointing, or drop keep_attention_outputs"):
        train(tmp_path / "c", gradient_checkpointing_kwargs={"keep_attention_outputs": True})
    with pytest.raises(ValueError, match='is true \\(every layer\\) or a number of layers, got -1'):
        train(tmp_path / "d", gradient_checkpointing=True, gradient_checkpointing_kwargs={"keep_attention_outputs": -1})
    with pytest.raises(ValueError, match='needs the non-reentrant checkpoint: drop "use_reentrant": true'):
        train(tmp_path / "e", gradient_checkpointing=True,
              gradient_checkpointing_kwargs={"keep_attention_outputs": 1, "use_reentrant": True})


@pytest.mark.skipif(version.parse(transformers.__version__).major >= 5, reason="transformers 5 has it")
def test_every_n_layers_is_refused_before_transformers_5(tmp_path):
    for every_n_layers in (2, 1):  # 1 too: the key itself is what torch's checkpoint fails on
        with pytest.raises(ValueError, match='"every_n_layers" is an option of transformers 5'):
            train(tmp_path, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"every_n_layers": every_n_layers})
