"""The hidden-size scaling microbenchmark (benchmarks/bench_scaling.py) at a tiny size."""

import math

import pytest

from benchmarks.bench_scaling import loglog_slope, main, mlp_size


def test_loglog_slope_recovers_a_power_law():
    sizes = [64, 128, 256, 512]
    assert math.isclose(loglog_slope(sizes, [3.0 * s**2 for s in sizes]), 2.0)
    assert math.isclose(loglog_slope(sizes, [5.0 * s**0.5 for s in sizes]), 0.5)


def test_mlp_size_is_llama_like():
    assert mlp_size(4096) == 11008
    assert mlp_size(128) % 64 == 0 and mlp_size(128) >= 8 * 128 / 3


def test_tiny_run_reports_every_optimizer_and_writes_files(tmp_path):
    results = main(["--hidden", "64", "128", "--rank", "8", "--gap", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert set(results) == {64, 128}
    for by_label in results.values():
        assert "torch AdamW (foreach)" in by_label and "GaLorePlusAdamW svd" in by_label
        for row in by_label.values():
            assert row["ms"] > 0 and row["state_mib"] > 0
        # low-rank moments are smaller than AdamW's full ones
        assert by_label["GaLorePlusAdamW svd"]["state_mib"] < by_label["torch AdamW (foreach)"]["state_mib"]
    assert (tmp_path / "bench_scaling.md").stat().st_size > 0
    assert (tmp_path / "bench_scaling.json").stat().st_size > 0


def test_bad_hidden_size_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--hidden", "100", "--out", str(tmp_path)])
