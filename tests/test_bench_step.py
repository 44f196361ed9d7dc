"""Smoke test of benchmarks/bench_step.py (a benchmark, not a timing test): it runs and prints every row."""

import math

from benchmarks import bench_step


def test_bench_step_prints_every_optimizer_and_every_lever(capsys):
    bench_step.main(["--layer", "tiny", "--rank", "8", "--gaps", "3", "--levers"])
    out = capsys.readouterr().out
    for base in ("GaLore (svd)", "GaLore+"):
        for lever in bench_step.LEVERS:
            line = next(line for line in out.splitlines() if line.strip().startswith(f"{base} + {lever}"))
            assert math.isfinite(float(line.split()[-1]))          # a ratio is printed (its size is not tested)
    assert "GaLorePlusAdamW cross_head+randomized" in out
