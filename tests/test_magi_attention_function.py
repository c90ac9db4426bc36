"""The registered attention function inside a real Llama, in one process (a CP group of one rank):
the same logits as SDPA, in the run's dtype, and no [batch, 1, seq, seq] mask built for it; under gradient
checkpointing, calc_attn's kernel kept out of the recomputation (long_context.py)."""

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, default_data_collator

import magi_portable
import run_magi_clm
from long_context import enable_memory_options
from magi_utils import skip_causal_mask
from test_long_context import CountOperators


@pytest.fixture(scope="module")
def single_rank_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def tiny_llama(attn_implementation, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_magi_attention_matches_sdpa_without_a_4d_mask(single_rank_group, monkeypatch, dtype, tolerance):
    batch_size, seq_len = 3, 21
    input_ids = torch.randint(0, 64, (batch_size, seq_len))
    reference = tiny_llama("sdpa", dtype)(input_ids).logits

    model = tiny_llama("Magi_Attention", dtype)
    skip_causal_mask(model)
    masks, dtypes = [], []

    def recording_forward(module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(attention_mask)
        out, weights = run_magi_clm.magi_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        dtypes.append((query.dtype, out.dtype))
        return out, weights

    monkeypatch.setitem(run_magi_clm.ALL_ATTENTION_FUNCTIONS._global_mapping, "Magi_Attention", recording_forward)

    cu_seqlens_q, cu_seqlens_k = magi_portable.infer_varlen_mask_from_batch(batch_size, seq_len, device="cpu")
    key = magi_portable.magi_attn_varlen_key(
        cu_seqlens_q, cu_seqlens_k, 4, 2, 8, pad_size=magi_portable.compute_pad_size(63, 1, 8),
        cp_group_or_mesh=single_rank_group, causal=True, chunk_size=8,
    )
    logits = model(
        input_ids=magi_portable.dispatch(input_ids.flatten(), key).unsqueeze(0),
        position_ids=(magi_portable.get_position_ids(key) % seq_len).unsqueeze(0),
        magi_attn_key=key,
    ).logits
    logits = magi_portable.undispatch(logits.squeeze(0), key).view(batch_size, seq_len, -1)

    assert masks == [None] * model.config.num_hidden_layers
    assert dtypes == [(dtype, dtype)] * model.config.num_hidden_layers
    assert logits.dtype == dtype
    assert (logits - reference).abs().max() <= tolerance * reference.abs().max()


def test_kept_attention_outputs_spare_the_recomputation_calc_attns_kernel(single_rank_group, tmp_path):
    """run_magi_clm.py's trainer at CP 1 with gradient checkpointing, on documents of several lengths (varlen): with
    the attention outputs kept, calc_attn's kernel (magi_portable's operator) runs once a layer and step, not twice,
    and the training is the same, to the bit."""
    layers, steps, seq_len = 2, 2, 21
    position_ids = [list(range(8)) + list(range(13)), list(range(seq_len))]  # two documents, then one

    def train(name, checkpoint_kwargs):
        model = tiny_llama("Magi_Attention", torch.float32)
        skip_causal_mask(model)
        ids = torch.randint(0, 64, (4, seq_len), generator=torch.Generator().manual_seed(1)).tolist()
        dataset = [{"input_ids": i, "labels": i, "position_ids": position_ids[n % 2]} for n, i in enumerate(ids)]
        args = TrainingArguments(
            str(tmp_path / name), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, seed=0, gradient_checkpointing=True,
            gradient_checkpointing_kwargs=checkpoint_kwargs,
        )
        trainer = run_magi_clm.MagiTrainer(cp_size=1, model=model, args=args, train_dataset=dataset,
                                           data_collator=default_data_collator)
        enable_memory_options(trainer, None)
        operators = CountOperators()
        with operators:
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return operators.calls["magi_portable::attention"], losses, dict(model.named_parameters())

    kernel_runs, losses, params = train("reference", None)
    assert kernel_runs == 2 * layers * steps
    kept_kernel_runs, kept_losses, kept_params = train("kept", {"keep_attention_outputs": True})
    assert kept_kernel_runs == layers * steps
    assert kept_losses == losses
    for name, param in params.items():
        assert torch.equal(kept_params[name], param), name
