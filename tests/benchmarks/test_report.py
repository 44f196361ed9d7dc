"""The main job's summaries: lr grids widened at an edge, paired gaps with their t statistic, regime labels."""

import math
import statistics

import pytest

from benchmarks.finetune import select_lrs, steps_for
from benchmarks.report import add_gaps, choose_lr, regime_label, tokens_label, widened_lr
from benchmarks.training import cosine_schedule


@pytest.mark.parametrize("rates, best, expected", [
    ((1e-3, 3e-3, 1e-2), 1e-2, 3e-2),
    ((1e-3, 3e-3, 1e-2), 1e-3, 3e-4),
    ((3e-3, 1e-2, 3e-2), 3e-2, 1e-1),
    ((3e-3, 1e-2, 3e-2), 3e-3, 1e-3),
    ((1e-3, 3e-3, 1e-2), 3e-3, None),
    ((1e-2,), 1e-2, None),
    ((1e-3, 1e-2), None, None),
])
def test_widened_lr_steps_along_the_one_three_lattice(rates, best, expected):
    assert widened_lr(rates, best) == expected


class FakePool:
    """Validation loss (log10 lr - log10 best)^2: a bowl whose bottom is at ``best``."""

    def __init__(self, best):
        self.best, self.trained = best, []

    def train(self, keys):
        self.trained.extend(key for key in keys if key not in self.trained)
        return [{"method": m, "lr": lr, "seed": s, "status": "ok",
                 "validation_loss": (math.log10(lr) - math.log10(self.best)) ** 2} for m, lr, s in keys]


class Spec:
    name = "m"


@pytest.mark.parametrize("widen, expected", [
    (0, (1e-3, 3e-3, 1e-2)),
    (2, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    (3, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    (5, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),  # stops once the best is inside
])
def test_grids_are_widened_until_the_best_lr_is_inside(widen, expected):
    pool = FakePool(best=1e-1)
    assert select_lrs(pool, [Spec()], {"m": (1e-3, 3e-3, 1e-2)}, seed=0, widen=widen) == {"m": expected}
    assert sorted(lr for _, lr, _ in pool.trained) == list(expected)  # each lr trained once
    chosen = choose_lr(pool.train([("m", lr, 0) for lr in expected]))
    assert (chosen in (min(expected), max(expected))) == (widen < 3)


def test_paired_gap_and_t_statistic():
    losses = {"adamw": [2.0, 2.2, 2.1], "muon": [1.9, 2.0, 2.05], "x": [1.95, 2.1, 2.0]}
    runs = [{"method": m, "seed": s, "lr": 1.0, "status": "ok", "test_loss": v}
            for m, values in losses.items() for s, v in enumerate(values)]
    rows = [{"method": m, "status": "ok", "lr": 1.0} for m in losses]
    add_gaps(rows, runs)
    x = rows[2]
    differences = [a - b for a, b in zip(losses["x"], losses["adamw"])]
    assert x["gap_to_adamw"] == pytest.approx(statistics.fmean(differences))
    assert x["gap_to_adamw_t"] == pytest.approx(statistics.fmean(differences) / (statistics.stdev(differences) / 3**0.5))
    assert x["gap_to_muon"] == pytest.approx(statistics.fmean(a - b for a, b in zip(losses["x"], losses["muon"])))


def test_labels_say_the_regime_and_tokens_per_parameter():
    assert tokens_label(0.35) == "early training" and tokens_label(20) == "the field's horizon"
    label = regime_label({"regime": "pretrain", "model_size": "mini", "parameters": 80_000, "tokens_per_param": 20.4,
                          "seeds": [0, 1, 2]})
    assert "20.4 tokens per parameter" in label and "the field's horizon" in label and "3 seeds per method" in label
    assert steps_for(20, 80_208, 16, 128) == 784  # 784 x 2048 tokens >= 20 x 80 208


def test_schedule_warms_up_then_decays_to_its_final_share():
    factors = [cosine_schedule(step, 10, 100, 0.1) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.1) and min(factors[10:]) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
