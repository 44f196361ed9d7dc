"""Byte-level text corpora that ship with every Python install, and batches drawn from them.

* pre-training corpus: the standard library's ``.py`` sources (``sysconfig.get_paths()["stdlib"]``);
* fine-tuning corpus: the English help topics of ``pydoc_data.topics``, split by topic into
  training, validation and test parts (the stdlib sources are split by file the same way for the
  pre-training regime).

Tokens are bytes (0..255); no tokenizer and no download is needed.
"""

from __future__ import annotations

import os
import random
import sysconfig
from typing import Iterator

import torch
from torch import Tensor

VOCAB_SIZE = 257
PAD_TOKEN = 256


def _stdlib_source_paths(seed: int) -> list[str]:
    """The standard library's ``.py`` files (``site-packages`` excluded), sorted, then shuffled with ``seed``."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.join(folder, name) for name in sorted(files) if name.endswith(".py"))
    if not paths:
        raise RuntimeError(f"no .py sources found under the standard library folder {root}")
    random.Random(seed).shuffle(paths)
    return paths


def _read_until(paths: list[str], start: int, max_bytes: int) -> tuple[Tensor, int]:
    """(bytes of ``paths[start:]`` concatenated up to ``max_bytes``, index of the first file not read)."""
    chunks, total, index = [], 0, start
    while index < len(paths) and total < max_bytes:
        with open(paths[index], "rb") as handle:
            data = handle.read(max_bytes - total)
        chunks.append(data)
        total += len(data)
        index += 1
    if total == 0:
        raise RuntimeError("the standard library has too few .py sources for the requested corpus")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8), index


def stdlib_source_bytes(max_bytes: int, seed: int = 0) -> Tensor:
    """Up to ``max_bytes`` of standard-library Python sources as a uint8 tensor.

    Files are shuffled with ``seed`` and concatenated until the budget is reached, so the same
    settings give the same bytes.
    """
    return _read_until(_stdlib_source_paths(seed), 0, max_bytes)[0]


def stdlib_source_splits(train_bytes: int, heldout_bytes: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(train, validation, test) stdlib sources from disjoint files.

    train is :func:`stdlib_source_bytes` ``(train_bytes, seed)``; validation and test are the next
    files of the same shuffled list, up to ``heldout_bytes`` each.
    """
    paths = _stdlib_source_paths(seed)
    train, after_train = _read_until(paths, 0, train_bytes)
    validation, after_validation = _read_until(paths, after_train, heldout_bytes)
    test, _ = _read_until(paths, after_validation, heldout_bytes)
    return train, validation, test


def pydoc_topic_splits(heldout_every: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """(train, validation, test) uint8 tensors of ``pydoc_data.topics``, split by topic.

    Topics are sorted by name; every ``heldout_every``-th one is held out, and the held-out topics
    alternate between validation and test.
    """
    from pydoc_data.topics import topics

    parts: tuple[list[bytes], list[bytes], list[bytes]] = ([], [], [])
    for index, key in enumerate(sorted(topics)):
        part = 0 if index % heldout_every else 1 + (index // heldout_every) % 2
        parts[part].append(topics[key].encode("utf-8"))
    return tuple(torch.frombuffer(bytearray(b"\n".join(part)), dtype=torch.uint8) for part in parts)


def stream_bytes(steps: int, batch_size: int, seq_len: int) -> int:
    """Bytes a run of ``steps`` batches of :func:`window_batches` reads: each window once."""
    return steps * batch_size * (seq_len + 1)


def window_batches(data: Tensor, batch_size: int, seq_len: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` batches of ``batch_size`` windows of ``seq_len + 1`` bytes as int64 tokens, no byte seen twice.

    ``data`` is cut into non-overlapping windows, which are visited in an order drawn from ``generator``
    (the seed changes the data order, never the data).
    """
    count = data.numel() // (seq_len + 1)
    needed = steps * batch_size
    if count < needed:
        raise ValueError(f"corpus of {data.numel()} bytes holds {count} windows of seq_len + 1 = {seq_len + 1}, fewer "
                         f"than the {needed} that {steps} steps of batch {batch_size} read without repeating a byte")
    windows = data[: count * (seq_len + 1)].view(count, seq_len + 1)
    order = torch.randperm(count, generator=generator)[:needed].view(steps, batch_size)
    for rows in order:
        yield windows[rows].long()


def sample_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` bytes, as int64 tokens (input and shifted target); windows
    may overlap and repeat (the main job reads :func:`window_batches` instead)."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"corpus of {data.numel()} bytes is too short for windows of seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()


def eval_windows(data: Tensor, seq_len: int, max_windows: int) -> Tensor:
    """Up to ``max_windows`` non-overlapping windows of ``seq_len + 1`` bytes, evenly spread over ``data``."""
    count = min(max_windows, data.numel() // (seq_len + 1))
    if count < 1:
        raise ValueError(f"held-out corpus of {data.numel()} bytes is too short for one window of {seq_len + 1}")
    stride = data.numel() // count
    return torch.stack([data[i * stride: i * stride + seq_len + 1] for i in range(count)]).long()
