"""--document_masking: documents closed by an end-of-text token, cut into blocks with position ids that restart at
each document; the baseline's mask is each document on its own; the CP plan of real documents is balanced.

tests/test_cp_exactness.py checks that CP runs with --document_masking train exactly like the baseline with it.
`python3 -m tests.test_document_masking` prints the balance figures quoted in
docs/document_masking.md.
"""

import re
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import embedded_default
import magi_portable
from run_origin_clm import collate_with_document_mask, group_texts, tokenize_documents

BALANCE_BLOCK_SIZE, BALANCE_CP_SIZE = 8192, 4


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_default.prepare_default_corpus()[2])


def test_every_document_ends_with_the_end_of_text_token(tokenizer):
    texts = ["To be, or not to be, that is the question:\n", "Exeunt.", ""]
    documents = tokenize_documents(tokenizer, texts)
    assert set(documents) == {"input_ids"}  # no attention_mask: the document mask is built per batch
    for text, ids in zip(texts, documents["input_ids"]):
        assert ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def test_blocks_restart_position_ids_at_each_document_and_do_not_predict_across():
    # Four documents, each closed by its end-of-text token 99, in blocks of 4 tokens.
    documents = [[10, 11, 99], [20, 21, 22, 23, 99], [30, 99], [40, 41, 42, 43, 44, 99]]
    blocks = group_texts({"input_ids": documents}, 4, document_masking=True)
    assert blocks["input_ids"] == [[10, 11, 99, 20], [21, 22, 23, 99], [30, 99, 40, 41], [42, 43, 44, 99]]
    # Each document starts at 0, and so does each block: the pieces of documents cut by a block's start go on from 0.
    assert blocks["position_ids"] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3]]
    # A document's first token is no target (the model shifts the labels: label i is the target of token i - 1), so
    # an end-of-text token is never trained to predict the next document; the end-of-text token itself is a target.
    assert blocks["labels"] == [[-100, 11, 99, -100], [-100, 22, 23, 99], [-100, 99, -100, 41], [-100, 43, 44, 99]]


def test_without_document_masking_the_blocks_are_as_before():
    blocks = group_texts({"input_ids": [[1, 2, 3], [4, 5, 6, 7]]}, 3)
    assert blocks == {"input_ids": [[1, 2, 3], [4, 5, 6]], "labels": [[1, 2, 3], [4, 5, 6]]}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_the_baseline_mask_runs_each_document_on_its_own(attn_implementation):
    """The reference: the baseline model on packed blocks with the collator's mask gives, for every document (and
    piece of one), the logits of the same model run on that document alone."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).eval()
    documents = [torch.randint(1, 64, (n,)).tolist() + [0] for n in (5, 12, 1, 7, 20, 3, 9)]
    blocks = group_texts({"input_ids": documents}, 16, document_masking=True)
    features = [dict(zip(blocks, values)) for values in zip(*blocks.values())]
    batch = collate_with_document_mask(features, dtype=model.dtype)
    assert batch["attention_mask"].shape == (len(features), 1, 16, 16)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits
        pieces = 0
        for sample, positions in enumerate(batch["position_ids"]):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            for start, end in zip(starts, starts[1:]):
                alone = model(input_ids=batch["input_ids"][sample, start:end][None]).logits[0]
                torch.testing.assert_close(packed[sample, start:end], alone, rtol=1e-5, atol=1e-5)
                pieces += 1
    assert pieces > 2 * len(features)  # the blocks do hold several documents


# The embedded training text cut into documents before each scene heading (727 scenes of 84 to 35k tokens, and the
# 482k tokens before the first heading: texts without scenes) or at each blank line (40596 speeches, half of them
# under 22 tokens, up to 24k).
CUTS = {"scenes": r"\n(?=(?:SCENE|Scene) )", "speeches": r"\n\n"}


def balance(tokenizer, cut):
    """Each block of the cut corpus, as one CP 4 group gets it with one sample per device: the busiest rank's attention
    area / mean for the planner's chunks and for equal contiguous slices of the block."""
    text = Path(embedded_default.prepare_default_corpus()[0]).read_text()
    documents = [document for document in re.split(CUTS[cut], text) if document.strip()]
    blocks = group_texts(tokenize_documents(tokenizer, documents), BALANCE_BLOCK_SIZE, document_masking=True)
    planned, contiguous = [], []
    for positions in blocks["position_ids"]:
        positions = torch.tensor(positions)
        # As run_magi_clm.py's _prepare_inputs: a causal sequence starts wherever the position ids are 0.
        cu_seqlens = torch.nn.functional.pad((positions == 0).nonzero().flatten(), (0, 1), value=len(positions))
        chunk_size = magi_portable.default_chunk_size(len(positions), BALANCE_CP_SIZE)
        padded = len(positions) + magi_portable.compute_pad_size(len(positions), BALANCE_CP_SIZE, chunk_size)
        _, rank_areas = magi_portable.planning.assign_chunks(cu_seqlens.tolist(), True, chunk_size, BALANCE_CP_SIZE,
                                                             padded)
        planned.append(magi_portable.planning.area_imbalance(rank_areas))
        # A token at position p attends to p + 1 keys.
        slice_areas = (positions + 1).view(BALANCE_CP_SIZE, -1).sum(dim=1)
        contiguous.append(magi_portable.planning.area_imbalance(tuple(slice_areas.tolist())))
    return planned, contiguous


def test_document_masked_blocks_of_scenes_are_balanced_over_4_ranks(tokenizer):
    planned, _ = balance(tokenizer, "scenes")
    assert len(planned) > 200
    assert max(planned) <= 1.05


if __name__ == "__main__":
    tokenizer = AutoTokenizer.from_pretrained(embedded_default.prepare_default_corpus()[2])
    print(f"Blocks of {BALANCE_BLOCK_SIZE} tokens at CP {BALANCE_CP_SIZE}: busiest rank's attention area / mean, "
          "mean and worst over the blocks")
    for cut in CUTS:
        planned, contiguous = balance(tokenizer, cut)
        print(f"{cut} ({len(planned)} blocks): planner's chunks {statistics.mean(planned):.3f}, {max(planned):.3f}; "
              f"equal contiguous slices {statistics.mean(contiguous):.3f}, {max(contiguous):.3f}")
