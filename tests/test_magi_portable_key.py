"""magi_portable/key.py: one key object per setup, its checks, and the position ids; in one process (a CP group of
one rank). tests/test_magi_portable_collectives.py and tests/test_magi_portable_attention.py use keys at CP > 1."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import magi_portable as magi

HEADS = (4, 2, 16)  # query heads, key/value heads, head_dim


@pytest.fixture(scope="module")
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_the_same_setup_gives_the_same_key(group):
    cu = torch.tensor([0, 40, 101])
    key = magi.magi_attn_varlen_key(cu, cu, *HEADS, 11, group, causal=True, chunk_size=8)
    same = magi.magi_attn_varlen_key(cu, cu.clone(), *HEADS, 11, group, True, chunk_size=8)
    assert same is key and hash(same) == hash(key)
    assert magi.magi_attn_varlen_key(cu, cu, *HEADS, 11, group, causal=False, chunk_size=8) != key
    assert key.total_seqlen == 101 and key.padded_total_seqlen == 112 and key.num_local_tokens == 112
    assert key.cp_size == 1 and key.cp_rank == 0
    mesh_key = magi.magi_attn_varlen_key(cu, cu, *HEADS, 11, init_device_mesh("cpu", (1,)), causal=True, chunk_size=8)
    assert mesh_key.cp_size == 1
    # Without a chunk size, v1.1.1's default, which pad_size must fit.
    default_chunk = magi.default_chunk_size(101, 1)
    default_key = magi.magi_attn_varlen_key(cu, cu, *HEADS, magi.compute_pad_size(101, 1, default_chunk), group)
    assert default_key.chunk_size == default_chunk


def test_position_ids_are_global_and_pad_tokens_take_the_last(group):
    cu = torch.tensor([0, 5, 13])
    key = magi.magi_attn_varlen_key(cu, cu, *HEADS, 3, group, causal=True, chunk_size=4)
    assert magi.get_position_ids(key).tolist() == list(range(13)) + [12, 12, 12]


def test_bad_setups_are_named(group):
    cu = torch.tensor([0, 40, 101])
    with pytest.raises(ValueError, match="multiple of num_heads_kv"):
        magi.magi_attn_varlen_key(cu, cu, 3, 2, 16, 11, group, chunk_size=8)
    with pytest.raises(ValueError, match=r"use compute_pad_size\(101, 1, 8\) = 3"):
        magi.magi_attn_varlen_key(cu, cu, *HEADS, 12, group, chunk_size=8)
    with pytest.raises(NotImplementedError, match="window_size"):
        magi.magi_attn_varlen_key(cu, cu, *HEADS, 11, group, window_size=(4, 0), chunk_size=8)
    with pytest.raises(NotImplementedError, match="cu_seqlens_q must equal cu_seqlens_k"):
        magi.magi_attn_varlen_key(cu, torch.tensor([0, 101]), *HEADS, 11, group, chunk_size=8)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        magi.magi_attn_varlen_key(torch.tensor([1, 101]), torch.tensor([1, 101]), *HEADS, 11, group, chunk_size=8)
