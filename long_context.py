"""Activation memory at long context: two options of both scripts that move or split work without changing the math.

- `--gradient_checkpointing --gradient_checkpointing_kwargs '{"offload": true}'` keeps the checkpointed layer inputs
  (layers x tokens x hidden) in pinned CPU memory from the forward to the backward: transformers 5's own option,
  done here on both stacks (offload_decoder_saved_tensors), since 4.51 does not have it and 5.17 to 5.23 ask for
  pinned memory even on a machine without a GPU, which fails there.
- `--tiled_mlp_tokens N` runs each decoder layer's MLP over tiles of N tokens of the sequence, forward and backward,
  so that its intermediate activations (tokens x intermediate_size, 4x the hidden size in Llama) exist for one tile
  at a time (ALST's tiled MLP). A token's MLP output depends on that token alone.

The loss is the third large activation (tokens x vocabulary logits): `--use_liger_kernel` computes it in chunks.
"""

import logging

import torch
from transformers import TrainerCallback

from run_guards import UserError

logger = logging.getLogger(__name__)


def check_memory_options(args, tiled_mlp_tokens):
    """Refuse options that cannot work: the scripts call this at start, before any work."""
    if (args.gradient_checkpointing_kwargs or {}).get("offload", False) and not args.gradient_checkpointing:
        raise UserError(
            'gradient_checkpointing_kwargs {"offload": true} keeps the checkpointed layer inputs in CPU memory, and '
            "there are none without gradient checkpointing: add --gradient_checkpointing, or drop the offload."
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
    offload = bool((args.gradient_checkpointing_kwargs or {}).pop("offload", False))
    if args.gradient_checkpointing_kwargs == {}:
        args.gradient_checkpointing_kwargs = None
    decoder = trainer.model.get_decoder()
    if offload:
        logger.info("Gradient checkpointing keeps the checkpointed layer inputs in CPU memory.")
        offload_decoder_saved_tensors(decoder)
    if tiled_mlp_tokens:
        if not all(hasattr(layer, "mlp") for layer in getattr(decoder, "layers", [None])):
            raise ValueError(
                f"--tiled_mlp_tokens tiles each decoder layer's `mlp`, and {type(trainer.model).__name__} has no "
                "`layers[i].mlp`: drop --tiled_mlp_tokens for this model."
            )
        logger.info(f"Each decoder layer's MLP runs over tiles of {tiled_mlp_tokens} tokens.")
        trainer.add_callback(TileMLPsWhenTrainingStarts(tiled_mlp_tokens))


def offload_decoder_saved_tensors(decoder):
    """What the decoder saves for the backward goes to pinned CPU memory. Under gradient checkpointing that is each
    checkpointed layer's inputs (and the final norm's): the layers' own activations are recomputed in the backward,
    outside this context, and stay on the GPU."""
    forward = decoder.forward

    def forward_with_saved_tensors_on_cpu(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    decoder.forward = forward_with_saved_tensors_on_cpu


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
