"""Held-out loss against optimizer state: one point per method and rank, from several main-job results.

    python -m benchmarks.state_plot OUT RESULTS_DIR [RESULTS_DIR ...] [--methods adamw muon ...]

Each ``RESULTS_DIR`` holds a ``results.json`` written by :mod:`benchmarks.finetune` (one rank per directory:
``--rank``). Methods without a rank (AdamW, Muon, AdamW 8-bit) are drawn once, from the first directory that has
them. Every directory must come from the same regime, model and tokens per parameter: the plot compares ranks,
not regimes. Writes ``OUT/loss_vs_state.png`` and ``OUT/loss_vs_state.md`` (the points as a table).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from .report import method_styles, regime_label, save_figure

FULL_STATE_METHODS = ("adamw", "muon", "adamw8bit")  # their state does not depend on --rank
SAME_REGIME_KEYS = ("regime", "model_size", "steps", "batch_size", "seq_len")


@dataclass(frozen=True)
class StatePoint:
    """One method at one rank: its test loss (mean and std over seeds) and optimizer state."""

    method: str
    rank: int | None
    state_mib: float
    test_loss: float
    test_loss_std: float
    seeds: int


def state_points(results: list[dict]) -> list[StatePoint]:
    """The points of :func:`write_state_plot` from loaded ``results.json`` contents, one rank each.

    Raises ValueError when two results differ in a setting of :data:`SAME_REGIME_KEYS` or share a rank.
    """
    first = results[0]["settings"]
    ranks = [result["settings"]["rank"] for result in results]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"two results directories have the same rank: {ranks}")
    for result in results[1:]:
        differing = [key for key in SAME_REGIME_KEYS if result["settings"].get(key) != first.get(key)]
        if differing:
            raise ValueError(f"results of rank {result['settings']['rank']} differ from rank {first['rank']} in "
                             f"{differing}: the plot compares ranks of one regime")
    points, drawn = [], set()
    for result in results:
        rank = result["settings"]["rank"]
        for row in result["summary"]:
            if row["status"] != "ok":
                continue
            full = row["method"] in FULL_STATE_METHODS
            if full and row["method"] in drawn:
                continue
            drawn.add(row["method"])
            points.append(StatePoint(row["method"], None if full else rank, row["state_mib"], row["test_loss"],
                                     row["test_loss_std"], row["seeds"]))
    return points


def points_markdown(points: list[StatePoint]) -> str:
    """The points as a Markdown table, by method then rank (largest first)."""
    lines = ["| method | rank | optimizer state (MiB) | test loss (nats/byte, mean ± std) | seeds |",
             "|---|---|---|---|---|"]
    for point in sorted(points, key=lambda p: (p.method, -(p.rank or 1 << 30))):
        rank = "full" if point.rank is None else str(point.rank)
        lines.append(f"| {point.method} | {rank} | {point.state_mib:.3f} | {point.test_loss:.4f} ± "
                     f"{point.test_loss_std:.4f} | {point.seeds} |")
    return "\n".join(lines) + "\n"


def write_state_plot(points: list[StatePoint], meta: dict, out: str) -> list[str]:
    """Test loss (error bar: std over seeds) against optimizer state, a line through each method's ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(point.method for point in points))
    figure, axis = plt.subplots(figsize=(9, 6))
    for method, style in zip(methods, method_styles(len(methods))):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.state_mib)
        axis.errorbar([p.state_mib for p in mine], [p.test_loss for p in mine], yerr=[p.test_loss_std for p in mine],
                      label=method, capsize=3, **style)
        for point in mine if len(mine) > 1 else ():
            axis.annotate(f"r={point.rank}", (point.state_mib, point.test_loss), textcoords="offset points",
                          xytext=(4, 4), fontsize=7)
    axis.text(0.01, 0.01, "labels: the rank of a method measured at several ranks", transform=axis.transAxes,
              fontsize=7)
    axis.set_xlabel("optimizer state (MiB, bytes of tensors)")
    axis.set_ylabel("test loss at the validation-chosen lr (nats/byte)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    seeds = sorted({point.seeds for point in points})
    axis.set_title(f"Held-out loss against optimizer state, one point per method and rank ({'/'.join(map(str, seeds))}"
                   f" seeds)\n{regime_label(meta)}", fontsize=9)
    os.makedirs(out, exist_ok=True)
    table = os.path.join(out, "loss_vs_state.md")
    with open(table, "w") as handle:
        handle.write(f"{regime_label(meta)}\n\n{points_markdown(points)}")
    return [save_figure(figure, out, "loss_vs_state.png"), table]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for loss_vs_state.png and loss_vs_state.md")
    parser.add_argument("results", nargs="+", help="results folders of benchmarks.finetune, one rank each")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: every finished one)")
    args = parser.parse_args(argv)
    results = []
    for folder in args.results:
        with open(os.path.join(folder, "results.json")) as handle:
            results.append(json.load(handle))
    points = [point for point in state_points(results) if args.methods is None or point.method in args.methods]
    for path in write_state_plot(points, results[0]["settings"], args.out):
        print(path)


if __name__ == "__main__":
    main()
