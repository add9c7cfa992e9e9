"""The packed collator: budget rules, positions, token types, image slots, MLM masking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reolm.data.collate import IGNORE_INDEX, SequenceExample, split_sequences
from gpu_marks import cuda
from tiny_models import tiny_collator, tiny_model_config, tiny_tables

CLS, MASK, PAD = 2, 4, 0
IMAGE_TYPE, PAD_TYPE = 4, 5


def _split(batch, name):
    return split_sequences(getattr(batch, name), batch)


def test_budget_keeps_most_recent_items_first_and_positions():
    tokens, images = tiny_tables(num_items=20)
    lengths = tokens.lengths()
    history = list(range(12))
    col = tiny_collator(tokens, images, tiny_model_config(max_history_items=50, max_tokens=30), mlm_probability=0.0)
    batch = col([SequenceExample(history, None, 0)]).history
    # Expected: from item 11 backwards while 1 + sum(len + 1) <= 30.
    kept, used = [], 1
    for item in reversed(history):
        if used + lengths[item] + 1 > 30:
            break
        kept.append(item)
        used += lengths[item] + 1
    assert batch.image_item_index.tolist() == kept
    assert batch.num_real_tokens == used == batch.cu_seqlens[-1].item()
    # Each item: its text then one image token, all sharing item position j (CLS = 0).
    expected_ids, expected_pos, expected_types = [CLS], [0], [0]
    for j, item in enumerate(kept, start=1):
        ids, types, _ = tokens.item(item)
        expected_ids += ids.tolist() + [PAD]
        expected_types += types.tolist() + [IMAGE_TYPE]
        expected_pos += [j] * (len(ids) + 1)
    assert batch.input_ids.tolist() == expected_ids
    assert batch.item_position_ids.tolist() == expected_pos
    assert batch.token_type_ids.tolist() == expected_types
    assert batch.position_ids.tolist() == list(range(used))
    assert (batch.input_ids[batch.image_token_index] == PAD).all()


def test_max_history_items_limit_and_cu_seqlens():
    tokens, images = tiny_tables(num_items=20)
    col = tiny_collator(tokens, images, tiny_model_config(max_history_items=3, max_tokens=1000), mlm_probability=0.0)
    examples = [SequenceExample(list(range(10)), 15, 1), SequenceExample([4, 5], 16, 2),
                SequenceExample([7], 17, 3)]
    out = col(examples)
    hist = out.history
    assert hist.seq_num_items.tolist() == [3, 2, 1]
    # the stream holds sequences longest first; per-sequence fields stay in example order
    order = hist.token_seq_index[hist.cu_seqlens[:-1].long()].tolist()
    assert sorted(order) == [0, 1, 2]
    assert hist.stream_seq_lengths.tolist() == hist.seq_lengths[order].tolist()
    assert hist.stream_seq_lengths.tolist() == sorted(hist.seq_lengths.tolist(), reverse=True)
    kept = {0: [9, 8, 7], 1: [5, 4], 2: [7]}
    assert hist.image_item_index.tolist() == sum((kept[i] for i in order), [])
    for i, seq in enumerate(_split(hist, "input_ids")):
        assert seq[0] == CLS and hist.input_ids[hist.seq_cls_index[i]] == CLS
        assert len(seq) == 1 + sum(len(tokens.item(j)[0]) + 1 for j in kept[i])
    assert hist.cu_seqlens.dtype == torch.int32
    assert hist.cu_seqlens[-1].item() == hist.input_ids.shape[0] == hist.num_tokens
    assert hist.max_seqlen == int(hist.seq_lengths.max())
    assert hist.seq_domains.tolist() == [1, 2, 3]
    # Targets are separate [CLS] item sequences with their own domains.
    tgt = out.target
    assert out.target_items.tolist() == [15, 16, 17]
    assert sorted(tgt.image_item_index.tolist()) == [15, 16, 17]
    for seq, item in zip(_split(tgt, "input_ids"), [15, 16, 17]):
        assert seq.tolist() == [CLS] + tokens.item(item)[0].tolist() + [PAD]
    assert (tgt.mlm_labels == IGNORE_INDEX).all() and tgt.mlm_positions.numel() == 0
    # Image features gathered for the image tokens, has_image respected.
    assert torch.equal(hist.image_features, torch.from_numpy(images.features[hist.image_item_index.numpy()]))
    assert hist.image_present.tolist() == [bool(images.has_image[i]) for i in hist.image_item_index]


def test_padded_layout_matches_packed_tokens():
    tokens, images = tiny_tables(num_items=20)
    examples = [SequenceExample([1, 2, 3], None, 0), SequenceExample([5], None, 1)]
    packed = tiny_collator(tokens, images, mlm_probability=0.0)(examples).history
    padded = tiny_collator(tokens, images, mlm_probability=0.0, layout="padded")(examples).history
    length = packed.max_seqlen
    assert padded.input_ids.shape[0] == 2 * length
    real = padded.token_type_ids != PAD_TYPE
    assert torch.equal(padded.input_ids[real], packed.input_ids)
    assert torch.equal(padded.input_ids[padded.image_token_index], packed.input_ids[packed.image_token_index])
    assert padded.cu_seqlens.tolist() == [0, length, 2 * length]
    assert torch.equal(padded.seq_lengths, packed.seq_lengths)
    assert padded.attn_groups == [(2 * length, 2, length)]


def test_attention_groups_cover_every_token_once():
    from reolm.data.collate import attention_groups
    lengths = np.array([100, 60, 40, 33, 12, 7, 5])
    grid, groups = attention_groups(lengths, ratio=0.5)
    assert [g[1:] for g in groups] == [(2, 100), (2, 40), (2, 12), (1, 5)]  # new group below half
    assert sum(g[0] for g in groups) == lengths.sum() == len(grid)
    offset, first = 0, 0
    for tokens, n, longest in groups:
        g = grid[offset:offset + tokens]
        assert len(set(g.tolist())) == tokens and g.max() < n * longest
        expected = np.concatenate([i * longest + np.arange(m) for i, m in enumerate(lengths[first:first + n])])
        assert np.array_equal(g, expected)
        offset, first = offset + tokens, first + n
    assert attention_groups(lengths, ratio=0.0)[1] == [(lengths.sum(), 7, 100)]
    with pytest.raises(ValueError, match="sorted"):
        attention_groups(np.array([3, 9]), 0.5)


def test_whole_word_masking_rates_and_labels():
    tokens, images = tiny_tables(num_items=40, min_len=6, max_len=12)
    col = tiny_collator(tokens, images, tiny_model_config(max_history_items=50, max_tokens=1000), seed=3)
    rng = np.random.default_rng(0)
    examples = [SequenceExample(rng.integers(0, 40, 8).tolist(), None, 0) for _ in range(16)]
    text_total = chosen_total = masked = randomised = kept = 0
    for _ in range(25):
        batch = col(examples).history
        types, labels, ids = batch.token_type_ids, batch.mlm_labels, batch.input_ids
        text = (types >= 1) & (types <= 3)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~text).any(), "CLS / image tokens must never be masked"
        assert torch.equal(batch.mlm_positions, torch.nonzero(chosen).squeeze(1))
        text_total += int(text.sum())
        chosen_total += int(chosen.sum())
        masked += int((ids[chosen] == MASK).sum())
        kept += int((ids[chosen] == labels[chosen]).sum())
        randomised += int(((ids[chosen] != MASK) & (ids[chosen] != labels[chosen])).sum())
    rate = chosen_total / text_total
    assert 0.13 < rate < 0.17, rate
    assert abs(masked / chosen_total - 0.8) < 0.03
    # random replacements can hit the original token by chance (1/vocab), counted as kept
    assert abs(randomised / chosen_total - 0.1) < 0.03
    assert abs(kept / chosen_total - 0.1) < 0.03


def test_whole_words_are_masked_together():
    tokens, images = tiny_tables(num_items=30, min_len=6, max_len=12)
    col = tiny_collator(tokens, images, tiny_model_config(max_history_items=50, max_tokens=1000), seed=1,
                        mlm_probability=0.3)
    multi_token_words_masked = 0
    for _ in range(10):
        batch = col([SequenceExample(list(range(30)), None, 0)]).history
        chosen = (batch.mlm_labels != IGNORE_INDEX).numpy()
        # rebuild word starts of the stream: CLS, then per item its word_starts and the image token
        flags = [1]
        for item in batch.image_item_index.tolist():
            ws = tokens.item(item)[2].copy()
            ws[0] = 1
            flags += ws.tolist() + [1]
        word = np.cumsum(flags)
        assert len(word) == len(chosen) and chosen.any()
        for w in np.unique(word[chosen]):
            assert chosen[word == w].all(), "a word was only partly masked"
            multi_token_words_masked += int((word == w).sum() > 1)
    assert multi_token_words_masked > 0, "no word of several tokens was masked: the test saw nothing"


def test_bad_inputs_raise_clear_errors():
    tokens, images = tiny_tables(num_items=5)
    col = tiny_collator(tokens, images)
    with pytest.raises(ValueError, match="domain index 9"):
        col([SequenceExample([1, 2], None, 9)])
    with pytest.raises(ValueError, match="item index 7"):
        col([SequenceExample([1, 7], None, 0)])
    with pytest.raises(ValueError, match="every example"):
        col([SequenceExample([1], 2, 0), SequenceExample([1], None, 0)])


def test_empty_history_and_dataloader_workers():
    tokens, images = tiny_tables(num_items=10)
    col = tiny_collator(tokens, images, seed=5)
    batch = col([SequenceExample([], 3, 0), SequenceExample([1, 2], 4, 1)]).history
    assert split_sequences(batch.input_ids, batch)[0].tolist() == [CLS]
    assert batch.seq_num_items.tolist() == [0, 2]
    # In DataLoader workers: every worker gets its own generator, reproducible given the seed.
    examples = [SequenceExample(list(range(i, i + 5)), None, 0) for i in range(5)] * 4
    loader = torch.utils.data.DataLoader(examples, batch_size=5, num_workers=2, collate_fn=col)

    def epoch():
        return [b.history.mlm_labels for b in loader]

    torch.manual_seed(0)  # the DataLoader draws the workers' seeds from it
    first, next_epoch = epoch(), epoch()
    torch.manual_seed(0)
    again = epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # workers 0 and 1 mask the same examples differently
    assert not torch.equal(first[0], next_epoch[0])  # and differently every epoch


def test_reseed_makes_masks_a_function_of_the_seed():
    tokens, images = tiny_tables(num_items=10, min_len=6, max_len=12)
    col = tiny_collator(tokens, images)
    examples = [SequenceExample(list(range(10)), None, 0)]
    col.reseed(7)
    a = col(examples).history.mlm_labels
    b = col(examples).history.mlm_labels
    col.reseed(7)
    assert torch.equal(col(examples).history.mlm_labels, a) and not torch.equal(a, b)
    col._rng = np.random.default_rng(7)  # direct assignment (as the trainer does) is honoured too
    assert torch.equal(col(examples).history.mlm_labels, a)
    # ... also inside DataLoader workers, after the main process used the collator
    loader = torch.utils.data.DataLoader([examples], batch_size=None, num_workers=1,
                                         collate_fn=lambda ex: (col.reseed(7), col(ex))[1])
    assert torch.equal(next(iter(loader)).history.mlm_labels, a)


# ----------------------------------------------------------------------------- the batch types

def _assert_same_batch(a, b):
    """Every field equal, tensors with the same dtype and shape."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_batches_are_typed_and_move_and_pin():
    from reolm.data.batch import PackedBatch, TrainingBatch, move_batch
    tokens, images = tiny_tables(num_items=20)
    col = tiny_collator(tokens, images, seed=0)
    examples = [SequenceExample([1, 2, 3], 9, 1, user=4, key="k0"), SequenceExample(np.array([5]), 10, 0)]
    batch = col(examples)
    assert isinstance(batch, TrainingBatch) and isinstance(batch.history, PackedBatch)
    assert isinstance(batch.target, PackedBatch) and batch.keys == ["k0", ""] and batch.stream is None
    assert batch.num_sequences == batch.history.num_sequences == 2
    assert batch.num_real_tokens == batch.history.num_real_tokens + batch.target.num_real_tokens
    assert not hasattr(batch.history, "__getitem__")  # attribute access only
    assert batch.history.image_features.dtype == torch.float16  # as stored: the model casts
    moved = batch.to("cpu")
    assert moved is not batch and moved.keys == batch.keys
    _assert_same_batch(moved.history, batch.history)
    _assert_same_batch(moved.target, batch.target)
    assert torch.equal(moved.target_items, batch.target_items) and moved.target_items.dtype == torch.int64
    nested = move_batch({"a": [batch.history], "b": batch}, "cpu", non_blocking=False)
    _assert_same_batch(nested["a"][0], batch.history)
    _assert_same_batch(nested["b"].target, batch.target)
    no_target = col([SequenceExample([1, 2])]).to("cpu")
    assert no_target.target is None and no_target.target_items is None
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: a batch is built once, by the collator
        batch.history.layout = "padded"


@cuda
def test_batches_pin_and_move_to_cuda():
    tokens, images = tiny_tables(num_items=20)
    batch = tiny_collator(tokens, images, seed=0)([SequenceExample([1, 2, 3], 9, 1), SequenceExample([5], 10, 0)])
    pinned = batch.pin_memory()
    assert pinned.history.input_ids.is_pinned() and pinned.target_items.is_pinned()
    _assert_same_batch(pinned.history, batch.history)
    on_gpu = pinned.to("cuda")
    assert on_gpu.history.input_ids.is_cuda and on_gpu.history.max_seqlen == batch.history.max_seqlen
    _assert_same_batch(on_gpu.history.to("cpu"), batch.history)


def _worker_batches(pin_memory: bool) -> tuple[list, list]:
    """(batches of a 2-worker DataLoader, the examples) over a deterministic (no masking) collator."""
    tokens, images = tiny_tables(num_items=10)
    col = tiny_collator(tokens, images, seed=5, mlm_probability=0.0)
    examples = [SequenceExample(list(range(i, i + 3)), i + 3, i % 2) for i in range(6)] * 2
    loader = torch.utils.data.DataLoader(examples, batch_size=3, num_workers=2, collate_fn=col,
                                         pin_memory=pin_memory)
    return list(loader), examples


def test_dataloader_workers_return_training_batches():
    from reolm.data.batch import PackedBatch, TrainingBatch
    tokens, images = tiny_tables(num_items=10)
    col = tiny_collator(tokens, images, seed=5, mlm_probability=0.0)
    batches, examples = _worker_batches(pin_memory=False)
    assert len(batches) == 4
    for i, batch in enumerate(batches):
        assert isinstance(batch, TrainingBatch) and isinstance(batch.history, PackedBatch)
        assert isinstance(batch.target, PackedBatch) and isinstance(batch.history.attn_groups, list)
        _assert_same_batch(batch.history, col(examples[3 * i:3 * i + 3]).history)  # no masking: deterministic
        assert batch.target_items.tolist() == [e.target for e in examples[3 * i:3 * i + 3]]


@cuda
def test_dataloader_workers_pin_batches_for_cuda():
    batches, _ = _worker_batches(pin_memory=True)
    assert len(batches) == 4
    for batch in batches:
        assert batch.history.input_ids.is_pinned() and batch.target.input_ids.is_pinned()
        assert batch.target_items.is_pinned()


def test_one_example_type_keeps_histories_as_int64_arrays():
    history = np.array([4, 5, 6], dtype=np.int64)
    example = SequenceExample(history, 7, 1, user=3, key="x")
    assert example.history is history  # an int64 array is used as is, not copied
    listed = SequenceExample([4, 5, 6])
    assert listed.history.dtype == np.int64 and listed.history.tolist() == [4, 5, 6]
    assert (listed.target, listed.domain, listed.user, listed.key) == (None, 0, None, "")
    with pytest.raises(ValueError, match="flat sequence"):
        SequenceExample([[1, 2]])
    # The collator is where a history is cut: the most recent max_history_items items.
    tokens, images = tiny_tables(num_items=20)
    col = tiny_collator(tokens, images, tiny_model_config(max_history_items=3, max_tokens=1000), mlm_probability=0.0)
    assert col.select_history(np.arange(12)) == [11, 10, 9]
    long_batch = col([SequenceExample(np.arange(12))]).history
    short_batch = col([SequenceExample(np.arange(9, 12))]).history
    _assert_same_batch(long_batch, short_batch)
    assert col([(np.arange(12), None, 0)]).history.seq_num_items.tolist() == [3]  # plain tuples work too
