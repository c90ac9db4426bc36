"""magi_portable/collectives.py on real gloo process groups: dispatch and undispatch move tokens between the global and
the rank-local order, and their gradients and the K/V all-gather's go back the other way."""

import torch
from ranks import run_on_ranks

import magi_portable as magi
from magi_portable.collectives import GatherKV


def check_collectives(group):
    cp_size, rank = group.size(), group.rank()
    gen = torch.Generator().manual_seed(0)  # the same tensors on every rank
    cu = torch.tensor([0, 30, 31, 90, 101])
    key = magi.magi_attn_varlen_key(cu, cu, 4, 2, 16, magi.compute_pad_size(101, cp_size, 8), group, causal=True,
                                    chunk_size=8)
    # dispatch then undispatch is the identity (integer and float tensors); each rank holds its own tokens.
    tokens = torch.arange(101)
    local_tokens = magi.dispatch(tokens, key, pad_value=-1)
    assert local_tokens.shape == (key.num_local_tokens,)
    assert torch.equal(magi.undispatch(local_tokens, key), tokens)
    assert torch.equal(torch.where(local_tokens < 0, 100, local_tokens), magi.get_position_ids(key))
    every_rank = [torch.empty_like(local_tokens) for _ in range(cp_size)]
    torch.distributed.all_gather(every_rank, local_tokens, group=group)
    every_token = torch.cat(every_rank)
    assert sorted(every_token[every_token >= 0].tolist()) == list(range(101))

    # dispatch's gradient: each rank's loss reaches x through that rank's tokens only, so x's gradient is every
    # rank's gradient of its own tokens, put in place (weights differ per rank: a wrong order or owner shows).
    x = torch.randn(101, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(cp_size, 101, 3, generator=gen, dtype=torch.float64)
    (magi.dispatch(x, key) * magi.dispatch(weights[rank], key)).sum().backward()
    owner = torch.zeros(101, dtype=torch.long)
    is_token = every_token >= 0
    owner[every_token[is_token]] = torch.arange(cp_size).repeat_interleave(key.num_local_tokens)[is_token]
    assert torch.equal(x.grad, weights[owner, torch.arange(101)])
    # undispatch's gradient: every rank computes the same loss of the whole tensor, and keeps the gradient of its
    # own tokens (zero for its pad tokens).
    local = torch.randn(key.num_local_tokens, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    (magi.undispatch(local, key) * weights[0]).sum().backward()
    assert torch.equal(local.grad, magi.dispatch(weights[0], key))

    # The K/V all-gather, rank order; its backward reduce-scatters the gradients to their owners.
    kv = torch.full((4, 2), float(rank), requires_grad=True)
    gathered = GatherKV.apply(kv, group)
    assert torch.equal(gathered[:, 0], torch.arange(cp_size).repeat_interleave(4).float())
    (gathered * torch.arange(4 * cp_size).float()[:, None]).sum().backward()
    assert torch.equal(kv.grad[:, 0], cp_size * torch.arange(4 * rank, 4 * rank + 4).float())


def test_dispatch_undispatch_and_the_kv_gather(tmp_path):
    run_on_ranks(check_collectives, 4, tmp_path)  # 4 ranks: each holds chunks from several places
