"""Optimizer state in fewer bits and its checks: 8-bit moments, 8-bit AdamW of plain tensors, 4-bit bases, and the
check of a loaded checkpoint."""
