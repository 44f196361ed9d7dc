"""Summaries of the fine-tuning runs: the results table (Markdown, CSV, JSON) and the PNG plots."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics

from .methods import ALL_METHODS

MIB = 2**20
COLUMNS = ["method", "status", "seeds", "heldout_loss", "heldout_loss_std", "perplexity", "train_seconds", "step_ms",
           "refresh_share", "peak_mib", "params_mib", "grads_mib", "state_mib", "trainable_mib", "note"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(method: str, runs: list[dict]) -> dict:
    """One table row: means over the seeds of ``method`` (and the standard deviation of the held-out loss)."""
    ok = [run for run in runs if run["status"] == "ok"]
    if not ok:
        reasons = sorted({run.get("reason", "") for run in runs})
        return {"method": method, "status": runs[0]["status"] if runs else "not run", "seeds": 0, "note": "; ".join(reasons)}
    loss, loss_std = _mean_std([run["heldout_loss"] for run in ok])
    peak = {key: statistics.fmean(run["peak_bytes"][key] for run in ok) / MIB for key in ("params", "grads", "state")}
    return {
        "method": method, "status": "ok", "seeds": len(ok),
        "heldout_loss": loss, "heldout_loss_std": loss_std,
        "perplexity": math.exp(loss) if math.isfinite(loss) else float("nan"),
        "train_seconds": statistics.fmean(run["train_seconds"] for run in ok),
        "step_ms": statistics.fmean(run["step_ms"] for run in ok),
        "refresh_share": statistics.fmean(run["refresh_share"] for run in ok),
        "peak_mib": sum(peak.values()), "params_mib": peak["params"], "grads_mib": peak["grads"], "state_mib": peak["state"],
        "trainable_mib": statistics.fmean(run["trainable_bytes"] for run in ok) / MIB,
        "note": ALL_METHODS[method].description if method in ALL_METHODS else "",
    }


def _loss_cell(row: dict) -> str:
    """Mean held-out loss, with ± the standard deviation over seeds when there are several."""
    if row["seeds"] > 1:
        return f"{row['heldout_loss']:.4f} ± {row['heldout_loss_std']:.4f}"
    return f"{row['heldout_loss']:.4f}"


def markdown_table(rows: list[dict]) -> str:
    """The results table in Markdown: loss as mean ± std over seeds, memory in MiB, refresh share in %."""
    header = ["method", "held-out loss (nats/byte, mean ± std over seeds)", "perplexity", "train time (s)", "optimizer step (ms)",
              "refresh share", "peak params+grads+state (MiB)", "state (MiB)", "trainable (MiB)", "seeds", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["method"], f"**{row['status']}**"] + [""] * 7 + ["0", row["note"]]
        else:
            cells = [row["method"], _loss_cell(row), f"{row['perplexity']:.3f}",
                     f"{row['train_seconds']:.1f}", f"{row['step_ms']:.2f}", f"{100 * row['refresh_share']:.1f}%",
                     f"{row['peak_mib']:.3f}", f"{row['state_mib']:.3f}", f"{row['trainable_mib']:.3f}",
                     str(row["seeds"]), row["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_rows(rows: list[dict]) -> list[dict]:
    """The GaLore+ 32-bit rows, with their residual ratio and mode, ordered like the paper's Table 8."""
    picked = []
    for row in rows:
        spec = ALL_METHODS.get(row["method"])
        if spec is None or spec.family != "galore_plus" or spec.optim_bits != 32:
            continue
        mode = spec.residual_mode if spec.residual_ratio > 0 else "-"
        picked.append(dict(row, residual_ratio=spec.residual_ratio, residual_mode=mode))
    return sorted(picked, key=lambda row: (row["residual_mode"] != "-", row["residual_mode"], row["residual_ratio"]))


def ablation_markdown(rows: list[dict]) -> str:
    lines = ["| residual ratio | mode | held-out loss (nats/byte) | perplexity | optimizer step (ms) | state (MiB) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for row in ablation_rows(rows):
        if row["status"] != "ok":
            lines.append(f"| {row['residual_ratio']:.1%} | {row['residual_mode']} | **{row['status']}**: {row['note']} | | | | 0 |")
            continue
        lines.append(f"| {row['residual_ratio']:.1%} | {row['residual_mode']} | {_loss_cell(row)} | "
                     f"{row['perplexity']:.3f} | {row['step_ms']:.2f} | "
                     f"{row['state_mib']:.3f} | {row['seeds']} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], runs: list[dict], settings: dict, out: str) -> dict[str, str]:
    """Write results.md, results.csv and results.json to ``out``; return their paths."""
    paths = {kind: os.path.join(out, f"results.{kind}") for kind in ("md", "csv", "json")}
    with open(paths["md"], "w") as handle:
        handle.write("## Fine-tuning comparison\n\n" + markdown_table(rows))
        handle.write("\n## Residual ablation (GaLore+, paper Table 8)\n\n" + ablation_markdown(rows))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["json"], "w") as handle:
        json.dump({"settings": settings, "summary": rows, "runs": runs}, handle, indent=1)
    return paths


def write_plots(rows: list[dict], runs: list[dict], out: str) -> list[str]:
    """Loss curves, time bars, memory bars and the ablation plot as PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok"]
    names = [row["method"] for row in ok]
    paths = []

    ablation_names = {row["method"] for row in ablation_rows(ok)} - {"galore_plus"}
    panels = [("methods", [n for n in names if n not in ablation_names]),
              ("GaLore+ residual ablation", [n for n in names if n in ablation_names or n == "galore_plus"])]
    panels = [(title, members) for title, members in panels if members]
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for axis, (title, members) in zip(axes[0], panels):
        means = {name: _mean_curve(runs, name) for name in members}
        for index, (name, (steps, mean)) in enumerate(means.items()):
            axis.plot(steps, mean, label=name, color=colors[index % len(colors)])
        top = 1.02 * max(mean[0] for _, mean in means.values())
        clipped = [name for name, (_, mean) in means.items() if max(mean) > top]
        if clipped and math.isfinite(top):
            axis.set_ylim(top=top)
            title += f"\n(clipped above the starting loss: {', '.join(clipped)})"
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("fine-tuning step")
        axis.set_ylabel("held-out loss (nats/byte, mean over seeds)")
        axis.legend(fontsize=7)
    paths.append(_save(figure, out, "loss_curves.png"))

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    refresh = [row["step_ms"] * row["refresh_share"] for row in ok]
    left.barh(names, [row["step_ms"] for row in ok], label="optimizer step")
    left.barh(names, refresh, label="of which projector refresh")
    left.set_xlabel("ms per step (mean)")
    left.legend(fontsize=8)
    right.barh(names, [row["train_seconds"] for row in ok])
    right.set_xlabel("fine-tuning wall time (s, forward + backward + step)")
    for axis in (left, right):
        axis.invert_yaxis()
    figure.suptitle("Time")
    paths.append(_save(figure, out, "time.png"))

    figure, axis = plt.subplots(figsize=(9, 5.5))
    start = [0.0] * len(ok)
    for key in ("params", "grads", "state"):
        values = [row[f"{key}_mib"] for row in ok]
        axis.barh(names, values, left=start, label=key)
        start = [a + b for a, b in zip(start, values)]
    axis.invert_yaxis()
    axis.set_xlabel("MiB at peak (bytes of tensors)")
    axis.set_title("Memory: parameters + gradients + optimizer state")
    axis.legend()
    paths.append(_save(figure, out, "memory.png"))

    ablation = [row for row in ablation_rows(rows) if row["status"] == "ok"]
    if ablation:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        base = [row for row in ablation if row["residual_ratio"] == 0]
        for mode in ("exact", "paper"):
            points = sorted(base + [row for row in ablation if row["residual_mode"] == mode], key=lambda r: r["residual_ratio"])
            if len(points) > len(base):
                axis.errorbar([100 * r["residual_ratio"] for r in points], [r["heldout_loss"] for r in points],
                              yerr=[r["heldout_loss_std"] for r in points], marker="o", capsize=3, label=f"{mode} mode")
        axis.set_xlabel("residual ratio (% of q/k entries)")
        axis.set_ylabel("held-out loss (nats/byte)")
        axis.set_title("GaLore+ residual ablation")
        axis.legend()
        paths.append(_save(figure, out, "ablation.png"))
    return paths


def _mean_curve(runs: list[dict], method: str) -> tuple[list[int], list[float]]:
    """(evaluation steps, held-out loss at each, averaged over the method's seeds)."""
    curves = [run["curve"] for run in runs if run["method"] == method and run["status"] == "ok"]
    steps = [step for step, _ in curves[0]]
    return steps, [statistics.fmean(curve[i][1] for curve in curves) for i in range(len(steps))]


def _save(figure, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
