"""Smoke test of benchmarks/bench_projectors.py on a tiny shape, so the benchmark cannot rot."""

import pytest

from benchmarks import bench_projectors


def test_tiny_run_prints_every_method_with_4_bit_energies(capsys):
    pytest.importorskip("bitsandbytes")
    bench_projectors.main(["--models", "tiny", "--ranks", "8", "--repeats", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("tiny")]
    assert [row[4] for row in rows] == ["svd", "svd_lowrank", "randomized", "cross_head"]
    for row in rows:
        quantised, span = float(row[-2]), float(row[-1])
        assert 0.9 < quantised < 1.1 and 0.9 < span <= 1.0 + 1e-6
