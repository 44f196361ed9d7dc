"""The loss-against-state plot: one point per method and rank, full-state methods once, one regime only."""

import os

import pytest

from benchmarks.state_plot import StatePoint, points_markdown, state_points, write_state_plot

SETTINGS = {"regime": "pretrain", "model_size": "mini", "steps": 784, "batch_size": 16, "seq_len": 128,
            "parameters": 80208, "tokens_per_param": 20.0, "seeds": [0, 1, 2]}


def row(method, loss, state, status="ok"):
    return {"method": method, "status": status, "test_loss": loss, "test_loss_std": 0.01, "state_mib": state,
            "seeds": 3}


def result(rank, rows, **settings):
    return {"settings": dict(SETTINGS, rank=rank, **settings), "summary": rows}


def test_each_method_and_rank_is_one_point_and_full_state_methods_come_once():
    results = [result(12, [row("adamw", 1.72, 0.61), row("galore_plus", 1.71, 0.33)]),
               result(6, [row("adamw", 1.99, 0.61), row("galore_plus", 1.72, 0.27), row("muon", 1.0, 0.4, "failed")])]
    points = state_points(results)
    assert points == [StatePoint("adamw", None, 0.61, 1.72, 0.01, 3), StatePoint("galore_plus", 12, 0.33, 1.71, 0.01, 3),
                      StatePoint("galore_plus", 6, 0.27, 1.72, 0.01, 3)]
    table = points_markdown(points)
    assert table.index("| galore_plus | 12 |") < table.index("| galore_plus | 6 |")
    assert "| adamw | full | 0.610 | 1.7200 ± 0.0100 | 3 |" in table


def test_results_of_other_regimes_or_the_same_rank_are_refused():
    with pytest.raises(ValueError, match=r"differ from rank 12 in \['steps'\]"):
        state_points([result(12, []), result(6, [], steps=300)])
    with pytest.raises(ValueError, match="same rank"):
        state_points([result(12, []), result(12, [])])


def test_the_plot_and_its_table_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    points = state_points([result(12, [row("adamw", 1.72, 0.61), row("galore_plus", 1.71, 0.33)])])
    paths = write_state_plot(points, SETTINGS, str(tmp_path))
    assert [os.path.basename(path) for path in paths] == ["loss_vs_state.png", "loss_vs_state.md"]
    assert os.path.getsize(paths[0]) > 0
    with open(paths[1]) as handle:
        assert "20 tokens per parameter" in handle.read()
