"""The benchmark's corpora: window batches read every byte at most once, in an order set by the seed."""

import pytest
import torch

from benchmarks.text_data import stream_bytes, window_batches


def _batches(data, seed, steps=5, batch=3, seq_len=7):
    return list(window_batches(data, batch, seq_len, steps, torch.Generator().manual_seed(seed)))


def test_no_byte_is_seen_twice_and_windows_are_the_data():
    data = torch.arange(stream_bytes(5, 3, 7)) % 251
    positions = torch.arange(data.numel())
    batches = _batches(positions, seed=0)
    seen = torch.cat([batch.reshape(-1) for batch in batches])
    assert seen.numel() == data.numel() and torch.unique(seen).numel() == data.numel()
    for batch in batches:
        assert batch.shape == (3, 8) and batch.dtype == torch.int64
        assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(3, 7, dtype=torch.int64))  # contiguous windows
        assert (batch[:, 0] % 8 == 0).all()  # aligned on the window grid: no two windows overlap


def test_the_seed_changes_the_order_not_the_data():
    data = torch.randint(0, 256, (stream_bytes(5, 3, 7),), generator=torch.Generator().manual_seed(1))
    first, second = _batches(data, seed=0), _batches(data, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    rows = lambda batches: sorted(tuple(row.tolist()) for batch in batches for row in batch)  # noqa: E731
    assert rows(first) == rows(second)
    assert all(torch.equal(a, b) for a, b in zip(first, _batches(data, seed=0)))


def test_a_corpus_too_short_to_read_without_repeats_is_refused():
    with pytest.raises(ValueError, match="without repeating a byte"):
        _batches(torch.zeros(stream_bytes(5, 3, 7) - 1, dtype=torch.uint8), seed=0)
