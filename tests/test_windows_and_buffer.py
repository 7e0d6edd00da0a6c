"""Token windows with provenance, and the (shuffle) batcher."""

import torch

from lm_saes_core.activation.buffer import ActivationBatcher
from lm_saes_core.activation.config import BufferShuffleConfig
from lm_saes_core.activation.windows import build_windows


def test_windows_cut_documents_with_bos_padding_and_provenance():
    docs = [[10, 11, 12, 13, 14], [20, 21]]
    w = build_windows(docs, [7, 8], context_size=4, bos_token_id=1, pad_token_id=0, ignore_token_ids=[13])
    assert w["tokens"].tolist() == [[1, 10, 11, 12], [1, 13, 14, 0], [1, 20, 21, 0]]
    assert w["doc_index"].tolist() == [[7, 7, 7, 7], [7, 7, 7, -1], [8, 8, 8, -1]]
    assert w["doc_position"].tolist() == [[-1, 0, 1, 2], [-1, 3, 4, -1], [-1, 0, 1, -1]]
    assert w["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]
    # BOS, padding and ignored ids (13) are masked out
    assert w["mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0]]


def test_windows_without_bos_use_every_position():
    w = build_windows([[5, 6, 7]], [0], context_size=2, bos_token_id=None, pad_token_id=9)
    assert w["tokens"].tolist() == [[5, 6], [7, 9]]
    assert w["doc_position"].tolist() == [[0, 1], [2, -1]]
    assert w["mask"].tolist() == [[1, 1], [1, 0]]


def _rows(n, start=0):
    return {"x": torch.arange(start, start + n), "y": torch.arange(start, start + n) * 10}


def test_batcher_without_buffer_keeps_order():
    batcher = ActivationBatcher(batch_size=2)
    out = [b["x"].tolist() for b in batcher(_rows(1, i) for i in range(5))]
    assert out == [[0, 1], [2, 3], [4]]


def test_batcher_without_buffer_copies_only_the_batches_that_span_two_items():
    """A cache written shuffled is read in order: batches inside an item are views of it, not copies."""
    items = [_rows(10, 0), _rows(7, 10), _rows(3, 17)]
    batches = list(ActivationBatcher(batch_size=4)(items))
    assert [b["x"].tolist() for b in batches] == [list(range(i, min(i + 4, 20))) for i in range(0, 20, 4)]
    assert [b["y"].tolist() for b in batches] == [[10 * x for x in b["x"].tolist()] for b in batches]
    storages = {item["x"].untyped_storage().data_ptr() for item in items}
    views = [batch["x"].untyped_storage().data_ptr() in storages for batch in batches]
    assert views == [True, True, False, True, False]  # [8, 12) spans items 0-1, [16, 20) items 1-2


def test_shuffle_buffer_is_a_deterministic_permutation_that_mixes():
    def run(seed):
        batcher = ActivationBatcher(batch_size=16, buffer_size=256, shuffle=BufferShuffleConfig(perm_seed=seed))
        return list(batcher(_rows(40, 40 * i) for i in range(25)))

    batches = run(0)
    xs = torch.cat([b["x"] for b in batches])
    assert sorted(xs.tolist()) == list(range(1000))  # nothing lost or duplicated
    assert all(torch.equal(b["y"], b["x"] * 10) for b in batches)  # rows stay aligned across keys
    assert torch.equal(xs, torch.cat([b["x"] for b in run(0)]))  # same seed, same order
    assert not torch.equal(xs, torch.cat([b["x"] for b in run(1)]))
    first = batches[0]["x"]
    assert len(set((first // 40).tolist())) > 3  # one batch mixes rows of several input items
    assert [len(b["x"]) for b in batches[:-1]] == [16] * (len(batches) - 1)
