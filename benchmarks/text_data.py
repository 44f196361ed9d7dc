"""Byte-level text corpora that ship with every Python install, and batches drawn from them.

* pre-training corpus: the standard library's ``.py`` sources (``sysconfig.get_paths()["stdlib"]``);
* fine-tuning corpus: the English help topics of ``pydoc_data.topics``, split by topic into a
  training part and a held-out part.

Tokens are bytes (0..255); no tokenizer and no download is needed.
"""

from __future__ import annotations

import os
import random
import sysconfig

import torch
from torch import Tensor

VOCAB_SIZE = 257
PAD_TOKEN = 256


def stdlib_source_bytes(max_bytes: int, seed: int = 0) -> Tensor:
    """Up to ``max_bytes`` of standard-library Python sources as a uint8 tensor.

    Files (``site-packages`` excluded) are listed in sorted order, shuffled with ``seed`` and
    concatenated until the budget is reached, so the same settings give the same bytes.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.join(folder, name) for name in sorted(files) if name.endswith(".py"))
    random.Random(seed).shuffle(paths)
    chunks, total = [], 0
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes - total)
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise RuntimeError(f"no .py sources found under the standard library folder {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def pydoc_topic_bytes(heldout_every: int = 10) -> tuple[Tensor, Tensor]:
    """(train, held-out) uint8 tensors of ``pydoc_data.topics``; every ``heldout_every``-th topic is held out."""
    from pydoc_data.topics import topics

    train, heldout = [], []
    for index, key in enumerate(sorted(topics)):
        (heldout if index % heldout_every == 0 else train).append(topics[key].encode("utf-8"))
    return (torch.frombuffer(bytearray(b"\n".join(train)), dtype=torch.uint8),
            torch.frombuffer(bytearray(b"\n".join(heldout)), dtype=torch.uint8))


def sample_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` bytes, as int64 tokens (input and shifted target)."""
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
