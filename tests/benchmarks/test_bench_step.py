"""The step microbenchmark (benchmarks/bench_step.py) at a tiny size: it runs and reports every projector."""

import torch

from benchmarks.bench_step import main, refresh_cost


def test_refresh_cost_times_a_refresh_and_the_steps_without_one_for_every_projector():
    results = refresh_cost(size=32, heads=4, rank=4, plain_steps=2, refreshes=2)
    assert set(results) == {"svd", "randomized", "cross_head"}
    assert all(with_refresh > 0 and without > 0 for with_refresh, without in results.values())


def test_refresh_cost_command_prints_one_row_per_projector(capsys):
    threads = torch.get_num_threads()
    try:
        main(["--refresh-cost", "--size", "32", "--heads", "4", "--rank", "4", "--plain-steps", "1", "--refreshes", "1",
              "--cpu-time", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["svd", "randomized", "cross_head"]


def test_layer_table_has_the_random_projector_apollo_and_the_regeneration_cost(capsys):
    main(["--layer", "tiny", "--rank", "4", "--gaps", "2"])
    out = capsys.readouterr().out
    for label in ("GaLorePlusAdamW random (galore rule)", "GaLorePlusAdamW APOLLO", "GaLorePlusAdamW svd"):
        assert label in out
    fraction = float(out.split("ms per step = ")[1].split()[0])
    assert 0 <= fraction < 10


def test_only_runs_the_chosen_optimizers_beside_adamw(capsys):
    main(["--layer", "tiny", "--rank", "4", "--gaps", "2", "--only", "APOLLO"])
    out = capsys.readouterr().out
    assert "GaLorePlusAdamW APOLLO" in out and "torch AdamW (foreach)" in out
    assert "GaLorePlusAdamW svd" not in out and "regenerating" not in out


def test_levers_table_prints_a_ratio_for_every_lever(capsys):
    import math

    from benchmarks import bench_step

    threads = torch.get_num_threads()
    try:
        main(["--layer", "tiny", "--rank", "8", "--gaps", "3", "--levers", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for base in ("GaLore (svd)", "GaLore+ (no levers)"):
        for lever in bench_step.LEVERS:
            line = next(line for line in out.splitlines() if line.strip().startswith(f"{base} + {lever}"))
            assert math.isfinite(float(line.split()[-1]))          # a ratio is printed (its size is not tested)


def test_expert_stack_rows_time_the_batched_stack_its_loop_and_adamw(capsys):
    threads = torch.get_num_threads()
    try:
        main(["--experts", "2", "16", "8", "--rank", "2", "--plain-steps", "1", "--threads", "1", "--cpu-time"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for label in ("torch AdamW (foreach)", "GaLorePlusAdamW randomized, batched stack",
                  "GaLorePlusAdamW randomized, loop of 2 experts", "refresh step: loop / batched = "):
        assert label in out
