"""Activation memory at long context: options of both scripts that move, split or keep work without changing the math.

- `--gradient_checkpointing --gradient_checkpointing_kwargs '{"offload": true}'` keeps the checkpointed layer inputs
  (layers x tokens x hidden) in pinned CPU memory from the forward to the backward: transformers 5's own option,
  done here on both stacks (offload_decoder_saved_tensors), since 4.51 does not have it and 5.17 to 5.23 ask for
  pinned memory even on a machine without a GPU, which fails there.
- `--tiled_mlp_tokens N` runs each decoder layer's MLP over tiles of N tokens of the sequence, forward and backward,
  so that its intermediate activations (tokens x intermediate_size, 4x the hidden size in Llama) exist for one tile
  at a time (ALST's tiled MLP). A token's MLP output depends on that token alone.
- `--gradient_checkpointing --gradient_checkpointing_kwargs '{"keep_attention_outputs": N}'` (`true`: every layer)
  goes the other way: it spends memory to save time. The first N checkpointed layers keep the outputs of their
  attention kernel from the forward to the backward (KeepAttentionOutputs), so that their recomputation skips that
  kernel, a layer's costliest part at long context. Each costs tokens x heads x head_dim (as much as a layer input
  in Llama), in CPU memory with the offload.

The loss is the third large activation (tokens x vocabulary logits): `--use_liger_kernel` computes it in chunks.
"""

import contextlib
import logging
import math

import torch
import transformers
from packaging import version
from torch.utils._python_dispatch import TorchDispatchMode  # no public module has it; torch's own SAC uses it
from transformers import TrainerCallback

from run_guards import UserError

logger = logging.getLogger(__name__)


def check_memory_options(args, tiled_mlp_tokens):
    """Refuse options that cannot work: the scripts call this at start, before any work."""
    checkpoint_kwargs = args.gradient_checkpointing_kwargs or {}
    if checkpoint_kwargs.get("keep_attention_outputs", False) not in (False, 0):
        check_keep_attention_outputs(checkpoint_kwargs["keep_attention_outputs"], args.gradient_checkpointing,
                                     checkpoint_kwargs)
    if checkpoint_kwargs.get("offload", False) and not args.gradient_checkpointing:
        raise UserError(
            'gradient_checkpointing_kwargs {"offload": true} keeps the checkpointed layer inputs in CPU memory, and '
            "there are none without gradient checkpointing: add --gradient_checkpointing, or drop the offload."
        )
    every_n_layers = checkpoint_kwargs.get("every_n_layers", 1)
    if every_n_layers != 1 and checkpoint_kwargs.get("offload", False):
        raise UserError(
            'gradient_checkpointing_kwargs "every_n_layers" with {"offload": true} would send all the activations of '
            "the layers left without checkpointing to CPU memory (the offload here takes what the whole decoder keeps "
            "for the backward): drop one of the two."
        )
    if "every_n_layers" in checkpoint_kwargs and version.parse(transformers.__version__).major < 5:
        raise UserError(
            f'gradient_checkpointing_kwargs "every_n_layers" is an option of transformers 5, and transformers '
            f"{transformers.__version__} would hand it to torch's checkpoint, which fails on it: drop it, or use "
            "transformers 5 (requirements-current.txt)."
        )
    if tiled_mlp_tokens is not None and tiled_mlp_tokens <= 0:
        raise UserError(
            f"--tiled_mlp_tokens must be a positive number of tokens, got {tiled_mlp_tokens}: give a positive number, "
            "or leave it unset."
        )


def enable_memory_options(trainer, tiled_mlp_tokens):
    """Check and switch on the options, once the Trainer is made (it parses gradient_checkpointing_kwargs)."""
    args = trainer.args
    check_memory_options(args, tiled_mlp_tokens)
    # Taken out of what the Trainer hands to gradient_checkpointing_enable (done here instead), in place: transformers
    # 5.23 reads the same dict as activation_checkpointing_kwargs; 4.51 takes its default for None, not for {}.
    checkpoint_kwargs = args.gradient_checkpointing_kwargs or {}
    offload = bool(checkpoint_kwargs.pop("offload", False))
    keep_attention_outputs = checkpoint_kwargs.pop("keep_attention_outputs", False)
    decoder = trainer.model.get_decoder()
    if offload:
        logger.info("Gradient checkpointing keeps the checkpointed layer inputs in CPU memory.")
        offload_decoder_saved_tensors(decoder)
    if keep_attention_outputs not in (False, 0):
        num_layers = check_keep_attention_outputs(keep_attention_outputs, args.gradient_checkpointing,
                                                  checkpoint_kwargs)
        layers = "every checkpointed layer" if num_layers == math.inf else f"the first {num_layers} checkpointed layers"
        logger.info(f"Gradient checkpointing keeps the attention outputs of {layers} for the backward"
                    f"{' in CPU memory' if offload else ''}: their recomputation skips the attention kernel.")
        keep = KeepAttentionOutputs(num_layers, offload)
        decoder.register_forward_pre_hook(keep.start_forward)
        decoder.register_forward_hook(keep.report_once)
        checkpoint_kwargs.update(use_reentrant=False, context_fn=keep)  # context_fn needs the non-reentrant checkpoint
    if args.gradient_checkpointing_kwargs == {}:
        args.gradient_checkpointing_kwargs = None
    if tiled_mlp_tokens:
        if not all(hasattr(layer, "mlp") for layer in getattr(decoder, "layers", [None])):
            raise ValueError(
                f"--tiled_mlp_tokens tiles each decoder layer's `mlp`, and {type(trainer.model).__name__} has no "
                "`layers[i].mlp`: drop --tiled_mlp_tokens for this model."
            )
        logger.info(f"Each decoder layer's MLP runs over tiles of {tiled_mlp_tokens} tokens.")
        trainer.add_callback(TileMLPsWhenTrainingStarts(tiled_mlp_tokens))


def check_keep_attention_outputs(value, gradient_checkpointing, checkpoint_kwargs):
    """The number of layers that keep their attention outputs (math.inf for true: every one), or a clear error."""
    if value is not True and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise UserError(
            f'gradient_checkpointing_kwargs "keep_attention_outputs" is true (every layer) or a number of layers, got '
            f"{value!r}."
        )
    if not gradient_checkpointing:
        raise UserError(
            'gradient_checkpointing_kwargs {"keep_attention_outputs": ...} keeps attention outputs for the '
            "recomputation of checkpointed layers, and there is none without gradient checkpointing: add "
            "--gradient_checkpointing, or drop keep_attention_outputs."
        )
    if checkpoint_kwargs.get("use_reentrant", False):
        raise UserError(
            'gradient_checkpointing_kwargs "keep_attention_outputs" needs the non-reentrant checkpoint: drop '
            '"use_reentrant": true.'
        )
    return math.inf if value is True else value


def offload_decoder_saved_tensors(decoder):
    """What the decoder saves for the backward goes to pinned CPU memory. Under gradient checkpointing that is each
    checkpointed layer's inputs (and the final norm's): the layers' own activations are recomputed in the backward,
    outside this context, and stay on the GPU."""
    forward = decoder.forward

    def forward_with_saved_tensors_on_cpu(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    decoder.forward = forward_with_saved_tensors_on_cpu


# The attention kernels whose outputs a checkpointed layer can keep: magi_portable's operator (its fa4 and torch
# kernels) and the kernels of torch's scaled_dot_product_attention (which magi_portable's sdpa kernel calls too).
# The backward of each one needs only its inputs and its outputs.
ATTENTION_OPS = frozenset({
    "magi_portable::attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
})


class KeepAttentionOutputs:
    """torch.utils.checkpoint's context_fn (as torch's selective activation checkpointing, with one policy): the
    first num_layers checkpointed layers of each forward keep the outputs of their attention kernel (out, lse and
    the like; ATTENTION_OPS) from the forward, and their recomputation in the backward takes those instead of running
    the kernel again. The rest of the layer is recomputed, the kernel's inputs too (at CP > 1 the all-gathered keys
    and values): the kernel's backward gets them from the recomputation and the outputs from here. With the offload,
    the outputs wait in pinned CPU memory, as the layer inputs do."""

    def __init__(self, num_layers, offload):
        # Plain attributes only: a Trainer saves its arguments (training_args.bin), this object among them.
        self.num_layers = num_layers
        self.offload = offload
        self.layers_left = num_layers
        self.bytes_kept = []  # by each layer that keeps, in this forward
        self.reported = False

    def start_forward(self, decoder, args):
        self.layers_left, self.bytes_kept = self.num_layers, []

    def __call__(self):
        if self.layers_left == 0:
            return contextlib.nullcontext(), contextlib.nullcontext()
        self.layers_left -= 1
        if self.offload:
            pack, unpack = copy_to_cpu_as_laid_out, copy_back
        else:
            pack = unpack = lambda tensor: tensor
        kept = []
        self.bytes_kept.append(0)
        return _KeepKernelOutputs(kept, pack, self.bytes_kept), _ReuseKernelOutputs(kept, unpack)

    def report_once(self, decoder, args, output):
        """After the first forward that checkpointed: what was kept, or that nothing was (a kernel outside
        ATTENTION_OPS: magi_portable's flex kernel, SDPA's math fallback, another attention implementation)."""
        if self.reported or not self.bytes_kept:
            return
        self.reported = True
        if 0 in self.bytes_kept:
            logger.warning(
                f"keep_attention_outputs: {self.bytes_kept.count(0)} of {len(self.bytes_kept)} checkpointed layers "
                "ran no attention kernel whose outputs can be kept (long_context.ATTENTION_OPS): their recomputation "
                "runs the attention again."
            )
        logger.info(f"Gradient checkpointing kept {sum(self.bytes_kept) / 2**20:.1f} MiB of attention outputs"
                    f"{' in CPU memory' if self.offload else ''} in this forward: {len(self.bytes_kept)} layers, "
                    f"{max(self.bytes_kept) / 2**20:.1f} MiB each.")


def copy_to_cpu_as_laid_out(tensor):
    """A copy in (pinned) CPU memory with the tensor's own strides. save_on_cpu's copies are contiguous, and the
    backward of cuDNN's attention computes wrong gradients from an output laid out otherwise than its forward gave it
    (SDPA's out is [batch, heads, tokens, d] over memory in [batch, tokens, heads, d] order)."""
    copy = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu",
                               pin_memory=torch.cuda.is_available())
    copy.copy_(tensor, non_blocking=copy.is_pinned())  # the copy back waits for it: same stream
    return tensor.device, copy


def copy_back(packed):
    device, copy = packed
    return copy.to(device, non_blocking=copy.is_pinned())  # .to keeps the strides of a dense tensor


class _KernelOutputsMode(TorchDispatchMode):
    """What both sides of KeepAttentionOutputs share: code compiled by torch.compile (magi_portable's flex kernel)
    runs compiled inside them, as inside torch's own selective checkpointing, and higher-order operators pass
    through."""

    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls):
        return True


class _KeepKernelOutputs(_KernelOutputsMode):
    """The forward's side of KeepAttentionOutputs: runs every operator, and keeps the attention kernels' outputs."""

    def __init__(self, kept, pack, bytes_kept):
        super().__init__()
        self.kept, self.pack = kept, pack
        self.bytes_kept, self.layer = bytes_kept, len(bytes_kept) - 1  # this layer's entry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        if func.name() in ATTENTION_OPS:
            # detach(): what is kept must not hold on to this forward's autograd graph.
            self.kept.append((func, [(True, self.pack(t.detach())) if isinstance(t, torch.Tensor) else (False, t)
                                     for t in outputs]))
            self.bytes_kept[self.layer] += sum(t.numel() * t.element_size()
                                               for t in outputs if isinstance(t, torch.Tensor))
        return outputs


class _ReuseKernelOutputs(_KernelOutputsMode):
    """The recomputation's side: the attention kernels return what the forward kept, in the same order; every other
    operator runs."""

    def __init__(self, kept, unpack):
        super().__init__()
        self.kept, self.unpack = kept, unpack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() not in ATTENTION_OPS:
            return func(*args, **(kwargs or {}))
        kept_func, outputs = self.kept.pop(0) if self.kept else (None, [])
        if kept_func is not func:
            raise RuntimeError(
                f"The recomputation of a checkpointed layer ran {func} where its forward ran {kept_func}."
            )
        return tuple(self.unpack(value) if is_tensor else value for is_tensor, value in outputs)


class TileMLPsWhenTrainingStarts(TrainerCallback):
    """Tiles the MLPs as training starts: --use_liger_kernel replaces their forward with its fused one before
    (in Trainer() on transformers 4.51, in Trainer.train on 5), and the tiles must run that one."""

    def __init__(self, tile_tokens):
        self.tile_tokens = tile_tokens

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for layer in model.get_decoder().layers:
            mlp = layer.mlp
            if not getattr(mlp, "is_tiled", False):
                mlp.forward, mlp.is_tiled = tiled_forward(mlp, mlp.forward, self.tile_tokens), True


def tiled_forward(mlp, forward, tile_tokens):
    def forward_in_tiles(hidden_states):
        weights = [p for p in mlp.parameters() if p.requires_grad]
        return TiledMLP.apply(forward, tile_tokens, hidden_states, *weights)

    return forward_in_tiles


class TiledMLP(torch.autograd.Function):
    """forward(x) over tiles of x along the sequence (dimension -2). The forward keeps only x; the backward runs
    forward again one tile at a time and sums the weights' gradients over the tiles (in float32), returning them
    once, so that each weight's gradient is accumulated once per backward, as DDP expects."""

    @staticmethod
    def forward(ctx, forward, tile_tokens, x, *weights):
        device_type = x.device.type
        ctx.forward, ctx.tile_tokens, ctx.weights = forward, tile_tokens, weights  # the parameters forward uses
        # The backward runs outside the autocast of the forward (--bf16 with float32 weights): recompute under the same.
        ctx.autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        ctx.save_for_backward(x)
        return torch.cat([forward(tile) for tile in x.split(tile_tokens, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_weights = [torch.zeros_like(w, dtype=torch.float32) for w in ctx.weights]
        autocast = torch.autocast(x.device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast_dtype is not None)
        with torch.enable_grad(), autocast:
            for x_tile, grad_tile, grad_x_tile in zip(
                x.split(ctx.tile_tokens, dim=-2), grad_output.split(ctx.tile_tokens, dim=-2),
                grad_x.split(ctx.tile_tokens, dim=-2),
            ):
                x_tile = x_tile.detach().requires_grad_()
                grads = torch.autograd.grad(ctx.forward(x_tile), (x_tile, *ctx.weights), grad_tile)
                grad_x_tile.copy_(grads[0])
                for total, grad in zip(grad_weights, grads[1:]):
                    total += grad
        return (None, None, grad_x, *(g.to(w.dtype) for g, w in zip(grad_weights, ctx.weights)))
