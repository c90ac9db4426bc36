"""Activation memory at long context: options of both scripts that move, split or keep work without changing the math.

- `--gradient_checkpointing --gradient_checkpointing_kwargs '{"offload": true}'` keeps the checkpointed layer inputs
  (layers x tokens x hidden) in pinned CPU memory from the forward to the backward: transformers 5's own option,
  done here on both stacks (CPUOffload), since 4.51 does not have it and 5.17 to 5.23 ask for pinned memory even on
  a machine without a GPU, which fails there. Its copies run beside the computation, not in its way.
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
    offload = None
    keep_attention_outputs = checkpoint_kwargs.pop("keep_attention_outputs", False)
    decoder = trainer.model.get_decoder()
    if checkpoint_kwargs.pop("offload", False):
        logger.info("Gradient checkpointing keeps the checkpointed layer inputs in CPU memory.")
        offload = CPUOffload(trainer.model.config.num_hidden_layers)
        offload_decoder_saved_tensors(decoder, offload)
    if keep_attention_outputs not in (False, 0):
        num_layers = check_keep_attention_outputs(keep_attention_outputs, args.gradient_checkpointing,
                                                  checkpoint_kwargs)
        layers = "every checkpointed layer" if num_layers == math.inf else f"the first {num_layers} checkpointed layers"
        where = " in CPU memory" if offload is not None else ""
        logger.info(f"Gradient checkpointing keeps the attention outputs of {layers} for the backward{where}: their "
                    "recomputation skips the attention kernel.")
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


class CPUOffload:
    """Tensors saved for the backward wait in (pinned) CPU memory: under gradient checkpointing each checkpointed
    layer's inputs and, with keep_attention_outputs, its kept attention outputs. On a GPU the copies run on a stream
    of their own, beside the computation (torch's save_on_cpu copies on the computation's stream: 6.7% of an 8B step
    at 131072 tokens): each tensor goes out as it is saved, and comes back one tensor ahead of the backward's need.
    The backward takes them in the same order every step (a layer's inputs, then its kept outputs, layer by layer
    from the last; the final norm's in an order of its own): the first step guesses the reverse of the forward's
    order and records the backward's, the steps after follow that record.
    No record_stream: a block so marked is not reused before the copy stream has passed it, and since the host
    queues work far ahead of the GPU, the allocator took 21 GiB more for an 8B step. Instead the computation's
    stream waits for a copy out before the tensor is let go, about a layer after it was saved, and a copy back is
    made in memory of the computation's stream, after what that stream has queued.
    Each copy keeps its tensor's strides: cuDNN's attention backward computes wrong gradients from a contiguous copy
    of its output (SDPA's out is [batch, heads, tokens, d] over memory in [batch, tokens, heads, d] order)."""

    def __init__(self, num_layers):
        self.num_layers = num_layers
        self.stream = None  # made at the first tensor saved on a GPU
        # Of the last forward: the bytes a layer saved (how much to hold on its way out), the largest tensor saved
        # (how much to bring back ahead).
        self.layer_share = self.largest_saved = 0
        self.saved = []  # this forward's copies in the order saved
        self.taken = []  # their indices in the order the backward takes them
        self.backward_order = None  # the last whole backward's
        self.not_yet_back, self.came_back_ahead = [], []
        self.going_out = []  # (tensor, its bytes, the copy stream's event after its copy out), oldest first
        self.bytes_going_out = self.bytes_ahead = 0

    def __getstate__(self):
        # A Trainer saves its arguments (training_args.bin), KeepAttentionOutputs and so this among them: no copies.
        return {"num_layers": self.num_layers}

    def __setstate__(self, state):
        self.__init__(**state)

    @contextlib.contextmanager
    def saving_for_backward(self):
        """Within it, what autograd saves for the backward goes through this offload (a forward's worth)."""
        self.start_forward()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self.end_forward()

    def start_forward(self):
        # Copied back ahead, and the last backward did not take them: their memory is the computation's once their
        # copies are done.
        for copy in self.came_back_ahead:
            if copy.device.type == "cuda":
                torch.cuda.current_stream(copy.device).wait_event(copy.on_device[1])
        if self.saved and len(self.taken) == len(self.saved):
            self.backward_order = self.taken
        self.saved, self.taken, self.not_yet_back, self.came_back_ahead = [], [], [], []
        self.bytes_ahead = 0

    def end_forward(self):
        self.let_go_of_copied_out(keep_bytes=0)
        self.layer_share = sum(copy.cpu.nbytes for copy in self.saved) / self.num_layers
        self.largest_saved = max((copy.cpu.nbytes for copy in self.saved), default=0)
        # Taken from the end: the reverse of the order needed. The recorded order holds if this forward saved as
        # many tensors as the recorded one.
        self.not_yet_back = list(self.saved)
        if self.backward_order is not None and len(self.backward_order) == len(self.saved):
            self.not_yet_back = [self.saved[index] for index in reversed(self.backward_order)]

    def pack(self, tensor):
        copy = _CPUCopy(len(self.saved), tensor.device,
                        torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda))
        if tensor.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(tensor.device)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
            with torch.cuda.stream(self.stream):
                copy.cpu.copy_(tensor, non_blocking=True)
            self.going_out.append((tensor, copy.cpu.nbytes, self.stream.record_event()))
            self.bytes_going_out += copy.cpu.nbytes
            self.let_go_of_copied_out(keep_bytes=self.layer_share)
        else:
            copy.cpu.copy_(tensor)
        self.saved.append(copy)
        return copy

    def let_go_of_copied_out(self, keep_bytes):
        """The oldest tensors on their way out, all but the last keep_bytes: the computation waits for their copies
        (long done by then, about a layer later) before it can reuse their memory."""
        while self.going_out and self.bytes_going_out > keep_bytes:
            tensor, nbytes, copied_out = self.going_out.pop(0)
            torch.cuda.current_stream(tensor.device).wait_event(copied_out)
            self.bytes_going_out -= nbytes

    def unpack(self, copy):
        if not copy.used:
            self.taken.append(copy.index)
        if copy.on_device is None:
            self.copy_back(copy)
        else:
            self.bytes_ahead -= copy.cpu.nbytes
            self.came_back_ahead.remove(copy)
        tensor, arrived = copy.on_device
        copy.on_device, copy.used = None, True
        if arrived is not None:
            torch.cuda.current_stream(tensor.device).wait_event(arrived)
        # The next tensors the backward will take, up to the largest one's bytes, on their way back while this one
        # is used.
        while self.not_yet_back and self.bytes_ahead < self.largest_saved:
            ahead = self.not_yet_back.pop()
            if not ahead.used and ahead.on_device is None:
                self.copy_back(ahead)
                self.came_back_ahead.append(ahead)
                self.bytes_ahead += ahead.cpu.nbytes
        return tensor

    def copy_back(self, copy):
        if copy.device.type != "cuda":
            copy.on_device = copy.cpu.to(copy.device), None
            return
        # Memory of the computation's stream, which that stream may have used until now: the copy waits for it.
        tensor = torch.empty_like(copy.cpu, device=copy.device)
        self.stream.wait_stream(torch.cuda.current_stream(copy.device))
        with torch.cuda.stream(self.stream):
            tensor.copy_(copy.cpu, non_blocking=True)
            copy.on_device = tensor, self.stream.record_event()


class _CPUCopy:
    def __init__(self, index, device, cpu):
        self.index, self.device, self.cpu = index, device, cpu
        self.on_device = None  # (tensor, the copy stream's event after its copy back, or None) until unpacked
        self.used = False


def offload_decoder_saved_tensors(decoder, offload):
    """What the decoder saves for the backward goes to CPU memory. Under gradient checkpointing that is each
    checkpointed layer's inputs (and the final norm's): the layers' own activations are recomputed in the backward,
    outside this context, and stay on the GPU."""
    forward = decoder.forward

    def forward_with_saved_tensors_on_cpu(*args, **kwargs):
        with offload.saving_for_backward():
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
    and values): the kernel's backward gets them from the recomputation and the outputs from here. With the offload
    (a CPUOffload), the outputs wait in CPU memory with the layer inputs."""

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
        if self.offload is not None:
            pack, unpack = self.offload.pack, self.offload.unpack
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
        where = " in CPU memory" if self.offload is not None else ""
        logger.info(f"Gradient checkpointing kept {sum(self.bytes_kept) / 2**20:.1f} MiB of attention outputs{where} "
                    f"in this forward: {len(self.bytes_kept)} layers, {max(self.bytes_kept) / 2**20:.1f} MiB each.")


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
