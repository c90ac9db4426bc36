"""The CP group's collectives, with their autograd: the K/V all-gather of calc_attn, dispatch and undispatch."""

import torch
import torch.distributed as dist

from .key import DistAttnRuntimeKey

# torch 2.13 renamed these two collectives (the old names warn); older torch has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenation of every rank's x along dim 0, in rank order (plain collective, no autograd)."""
    if dist.get_world_size(group) == 1:
        return x
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


class GatherKV(torch.autograd.Function):
    """All-gather along the token dim; backward reduce-scatters the gradient to its owner.
    (torch.distributed.nn.functional.all_gather does the same, but its gloo backward
    falls back to a scatter that breaks on groups without global rank 0.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        grad = grad_out.new_empty((grad_out.shape[0] // dist.get_world_size(ctx.group), *grad_out.shape[1:]))
        _reduce_scatter_single(grad, grad_out.contiguous(), group=ctx.group)
        return grad, None


class _Dispatch(torch.autograd.Function):
    """Take this rank's tokens of a replicated global tensor.

    Every rank holds the same x, and each rank's loss only reaches x through its own tokens, so
    the gradient of x is every rank's local gradient put back in place: an all-gather. (The
    autograd all-gather of torch.distributed.nn does the opposite direction, so it can't be used.)"""

    @staticmethod
    def forward(ctx, padded_x, key):
        ctx.key = key
        return padded_x.index_select(0, key.plan.local_token_index.to(padded_x.device))

    @staticmethod
    def backward(ctx, grad_local):
        plan = ctx.key.plan
        grad_gathered = all_gather(grad_local, ctx.key.cp_group)
        return grad_gathered.index_select(0, plan.global_to_dispatch.to(grad_local.device)), None


class _Undispatch(torch.autograd.Function):
    """Rebuild the global tensor on every rank. Its adjoint is _Dispatch's forward: each rank
    keeps the gradient of its own tokens, no sum (every rank computes the same global loss)."""

    @staticmethod
    def forward(ctx, x_local, key):
        ctx.key = key
        gathered = all_gather(x_local, key.cp_group)
        return gathered.index_select(0, key.plan.global_to_dispatch.to(x_local.device))[: key.total_seqlen]

    @staticmethod
    def backward(ctx, grad_global):
        key = ctx.key
        pad = grad_global.new_zeros((key.pad_size, *grad_global.shape[1:]))
        grad_padded = torch.cat([grad_global, pad])
        return grad_padded.index_select(0, key.plan.local_token_index.to(grad_global.device)), None


def dispatch(x: torch.Tensor, key: DistAttnRuntimeKey, pad_value: float = 0.0) -> torch.Tensor:
    """Global [total_tokens, ...] (same on every rank) -> this rank's padded chunks, in chunk order."""
    if x.shape[0] != key.total_seqlen:
        raise ValueError(f"dispatch expects {key.total_seqlen} tokens in dim 0, got {x.shape[0]}")
    padded_x = torch.cat([x, x.new_full((key.pad_size, *x.shape[1:]), pad_value)])
    return _Dispatch.apply(padded_x, key)


def undispatch(x: torch.Tensor, key: DistAttnRuntimeKey) -> torch.Tensor:
    """This rank's [local_tokens, ...] -> the global [total_tokens, ...] on every rank."""
    if x.shape[0] != key.num_local_tokens:
        raise ValueError(f"undispatch expects {key.num_local_tokens} tokens in dim 0, got {x.shape[0]}")
    return _Undispatch.apply(x, key)
