"""Triton kernels, importable as ``galore_plus.kernels``.

Each kernel file holds one kernel and its launcher; its torch reference of the same signature
lives in the ``galore_plus`` package, and one dispatch point, :mod:`galore_plus.kernels.dispatch`, chooses
between them.
"""
