"""Row blocks of a low-precision matrix through one float32 buffer: coverage, sizes, values, writing back."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.step.row_blocks import widened_row_blocks


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 40), n=st.integers(1, 30), block_values=st.integers(1, 200),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), transposed=st.booleans())
def test_blocks_cover_every_row_once_with_the_float32_values(m, n, block_values, dtype, transposed):
    stored = torch.randn((n, m) if transposed else (m, n)).to(dtype)
    matrix = stored.t() if transposed else stored  # a transposed weight is stepped as a strided view
    seen = []
    for rows, block in widened_row_blocks(matrix, block_values):
        assert block.dtype == torch.float32 and block.shape == (rows.stop - rows.start, n)
        assert block.numel() <= max(block_values, n)  # at least one row, else at most block_values values
        assert torch.equal(block, matrix[rows].float())  # half precision converts to float32 exactly
        seen += range(rows.start, rows.stop)
    assert seen == list(range(m))


def test_a_block_written_back_changes_those_rows_only():
    matrix = torch.arange(24.0).view(6, 4).bfloat16()
    start = matrix.clone()
    for rows, block in widened_row_blocks(matrix, 8):
        if rows.start == 2:
            block.add_(0.5)
            matrix[rows].copy_(block)
    assert torch.equal(matrix[2:4], start[2:4] + 0.5)
    assert torch.equal(matrix[:2], start[:2]) and torch.equal(matrix[4:], start[4:])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(experts=st.integers(1, 5), m=st.integers(1, 12), n=st.integers(1, 9), block_values=st.integers(1, 300))
def test_blocks_of_a_stack_cover_every_value_once(experts, m, n, block_values):
    """Rows of one expert, or whole experts, never both; each block about block_values values (at least one row)."""
    stack = torch.randn(experts, m, n).bfloat16()
    seen = torch.zeros(experts, m, n, dtype=torch.int64)
    for block, values in widened_row_blocks(stack, block_values):
        assert torch.equal(values, stack[block].float())
        assert values.numel() <= max(block_values, n)
        seen[block] += 1
    assert torch.equal(seen, torch.ones_like(seen))
