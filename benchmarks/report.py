"""Summaries of the runs: learning-rate choice, the results table (Markdown, CSV, JSON) and the PNG plots."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics

MIB = 2**20
REFERENCES = ("adamw", "muon")  # every table's gaps are paired differences to these two
COLUMNS = ["method", "status", "lr", "lr_at_grid_edge", "seeds", "test_loss", "test_loss_std", "gap_to_adamw",
           "gap_to_adamw_std", "gap_to_adamw_t", "gap_to_muon", "gap_to_muon_std", "gap_to_muon_t", "validation_loss", "perplexity", "train_seconds", "step_ms", "refresh_share",
           "refreshes", "peak_mib", "params_mib", "grads_mib", "state_mib", "trainable_mib", "note"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _finite_validation(run: dict) -> float:
    """A run's validation loss for the lr choice: diverged or failed runs count as +inf."""
    loss = run.get("validation_loss", math.inf) if run["status"] == "ok" else math.inf
    return loss if math.isfinite(loss) else math.inf


def choose_lr(selection_runs: list[dict]) -> float | None:
    """The learning rate of the run with the lowest final validation loss (None when every run failed or diverged)."""
    best = min(selection_runs, key=_finite_validation, default=None)
    return None if best is None or not math.isfinite(_finite_validation(best)) else best["lr"]


def _lattice(value: float) -> list[float]:
    """The learning-rate lattice (..., 1e-3, 3e-3, 1e-2, ...) from two decades below ``value`` to two above."""
    exponent = math.floor(math.log10(value))
    return [float(f"{mantissa}e{power}") for power in range(exponent - 2, exponent + 3) for mantissa in (1, 3)]


def widened_lr(rates: tuple[float, ...], best: float | None) -> float | None:
    """The learning rate that extends ``rates`` beyond the edge where ``best`` lies (the next value of the 1-3-10
    lattice), or None when ``best`` is inside the grid, missing, or the grid holds one value."""
    if best is None or len(rates) < 2:
        return None
    if best == max(rates):
        return min(value for value in _lattice(best) if value > 1.5 * best)
    if best == min(rates):
        return max(value for value in _lattice(best) if 1.5 * value < best)
    return None


def tokens_label(tokens_per_param: float) -> str:
    """What a run of ``tokens_per_param`` is called in our tables: the field measures at 20."""
    if tokens_per_param < 3:
        return "early training"
    return "under-trained" if tokens_per_param < 20 else "the field's horizon"


def regime_label(meta: dict) -> str:
    """One line that says what a table comes from: regime, model, tokens per parameter, seeds."""
    text = (f"{meta.get('regime', '')} regime, model {meta.get('model_size', '')} ({meta['parameters'] / 1e3:.0f} k "
            f"parameters), {meta['tokens_per_param']:.3g} tokens per parameter per run "
            f"({tokens_label(meta['tokens_per_param'])})") if "parameters" in meta else f"{meta.get('regime', '')} regime"
    if "base_tokens_per_param" in meta:
        text += f", from a model pre-trained to {meta['base_tokens_per_param']:.3g} tokens per parameter"
    return text + f", up to {len(meta.get('seeds', ()))} seeds per method"


def summarize(method: str, runs: list[dict], lr: float | None, grid: tuple[float, ...], note: str) -> dict:
    """One table row: the runs of ``method`` at its chosen ``lr``, means over seeds (test loss also its std)."""
    ok = [run for run in runs if run["status"] == "ok" and run["lr"] == lr]
    if not ok:
        statuses = {run["status"] for run in runs}
        status = next((s for s in ("unavailable", "not run") if s in statuses), "failed")
        reasons = [run.get("reason", "diverged") for run in runs if run["status"] == status or status == "failed"]
        return {"method": method, "status": status, "seeds": 0, "note": "; ".join(dict.fromkeys(reasons))}
    loss, loss_std = _mean_std([run["test_loss"] for run in ok])
    peak = {key: statistics.fmean(run["peak_bytes"][key] for run in ok) / MIB for key in ("params", "grads", "state")}
    return {
        "method": method, "status": "ok", "lr": lr, "lr_at_grid_edge": len(grid) > 1 and lr in (min(grid), max(grid)),
        "seeds": len(ok), "seed_list": [run["seed"] for run in ok],
        "test_loss": loss, "test_loss_std": loss_std,
        "validation_loss": statistics.fmean(run["validation_loss"] for run in ok),
        "perplexity": math.exp(loss) if math.isfinite(loss) else float("nan"),
        "train_seconds": statistics.fmean(run["train_seconds"] for run in ok),
        "step_ms": statistics.fmean(run["step_ms"] for run in ok),
        "refresh_share": statistics.fmean(run["refresh_share"] for run in ok),
        "refreshes": statistics.fmean(run["refresh_calls"] for run in ok),
        "peak_mib": sum(peak.values()), "params_mib": peak["params"], "grads_mib": peak["grads"], "state_mib": peak["state"],
        "trainable_mib": statistics.fmean(run["trainable_bytes"] for run in ok) / MIB,
        "note": note,
    }


def add_gaps(rows: list[dict], runs: list[dict]) -> None:
    """Set each row's test-loss gaps to every method of :data:`REFERENCES` present."""
    for reference in REFERENCES:
        add_gap(rows, runs, reference)


def add_gap(rows: list[dict], runs: list[dict], reference: str) -> None:
    """Set each row's test-loss gap to ``reference``: mean and std over seeds of the paired per-seed differences
    (both methods at their own chosen lr, same seed, i.e. same data order), and the paired t statistic
    mean / (std / sqrt(seeds)) (|t| > 4.3 is significant at 5 % with 3 seeds, two-sided)."""
    base = next((row for row in rows if row["method"] == reference and row["status"] == "ok"), None)
    if base is None:
        return
    base_loss = {run["seed"]: run["test_loss"] for run in runs
                 if run["method"] == reference and run["status"] == "ok" and run["lr"] == base["lr"]}
    for row in rows:
        if row["status"] != "ok":
            continue
        losses = {run["seed"]: run["test_loss"] for run in runs
                  if run["method"] == row["method"] and run["status"] == "ok" and run["lr"] == row["lr"]}
        differences = [losses[seed] - base_loss[seed] for seed in sorted(losses) if seed in base_loss]
        mean, std = _mean_std(differences)
        row[f"gap_to_{reference}"], row[f"gap_to_{reference}_std"] = mean, std
        row[f"gap_to_{reference}_t"] = (mean / (std / math.sqrt(len(differences))) if len(differences) > 1 and std > 0
                                        else float("nan"))


def _pm(mean: float, std: float, seeds: int, signed: bool = False) -> str:
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text + (f" ± {std:.4f}" if seeds > 1 else "")


def _gap(row: dict, reference: str) -> str:
    if row["method"] == reference:
        return "reference"
    if f"gap_to_{reference}" not in row:
        return ""
    text = _pm(row[f"gap_to_{reference}"], row[f"gap_to_{reference}_std"], row["seeds"], signed=True)
    t = row[f"gap_to_{reference}_t"]
    return text + (f" (t {t:+.1f})" if math.isfinite(t) else "")


def markdown_table(rows: list[dict]) -> str:
    """The results table: chosen lr, test loss mean ± std over seeds, paired gaps to AdamW and Muon, time, memory."""
    header = ["method", "lr (chosen on validation)", "test loss (nats/byte, mean ± std)", "gap to adamw (paired, t)",
              "gap to muon (paired, t)", "optimizer state (MiB)", "train time (s)", "optimizer step (ms)",
              "refresh share", "refreshes", "peak params+grads+state (MiB)", "trainable (MiB)", "seeds", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["method"], f"**{row['status']}**"] + [""] * 11 + [row["note"]]
        else:
            cells = [row["method"], f"{row['lr']:g}" + (" (grid edge)" if row["lr_at_grid_edge"] else ""),
                     _pm(row["test_loss"], row["test_loss_std"], row["seeds"]), _gap(row, "adamw"), _gap(row, "muon"),
                     f"{row['state_mib']:.3f}", f"{row['train_seconds']:.1f}", f"{row['step_ms']:.2f}",
                     f"{100 * row['refresh_share']:.1f}%", f"{row['refreshes']:.0f}", f"{row['peak_mib']:.3f}",
                     f"{row['trainable_mib']:.3f}", str(row["seeds"]), row["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lr_sweep_markdown(rows: list[dict], runs: list[dict], selection_seed: int) -> str:
    """Final validation loss of every method at every learning rate tried (the selection seed); the chosen one in bold."""
    rates = sorted({run["lr"] for run in runs if run.get("lr") is not None})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    chosen = {row["method"]: row.get("lr") for row in rows}
    for row in rows:
        selection = {run["lr"]: run for run in runs if run["method"] == row["method"] and run.get("lr") is not None
                     and run["seed"] == selection_seed}
        cells = []
        for lr in rates:
            run = selection.get(lr)
            if run is None:
                cells.append("")
            elif run["status"] != "ok":
                cells.append(run["status"])
            else:
                text = f"{run['validation_loss']:.4f}"
                cells.append(f"**{text}**" if lr == chosen[row["method"]] else text)
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def variants_markdown(rows: list[dict], runs: list[dict]) -> str:
    """Test loss of the variants of each trained model (DyLoRA at several ranks), mean ± std over the seeds of its
    chosen lr; empty when no method has variants."""
    lines = []
    for row in rows:
        ok = [run for run in runs if run["method"] == row["method"] and run["status"] == "ok"
              and run["lr"] == row.get("lr") and run.get("variant_test_losses")]
        if not ok:
            continue
        if not lines:
            lines = ["| method | variant | test loss (nats/byte, mean ± std) | seeds |", "|---|---|---|---|"]
        for variant in ok[0]["variant_test_losses"]:
            mean, std = _mean_std([run["variant_test_losses"][variant] for run in ok])
            lines.append(f"| {row['method']} | {variant} | {_pm(mean, std, len(ok))} | {len(ok)} |")
    return "\n".join(lines) + "\n" if lines else ""


def write_tables(rows: list[dict], runs: list[dict], settings: dict, out: str) -> dict[str, str]:
    """Write results.md, results.csv and results.json to ``out``; return their paths."""
    paths = {kind: os.path.join(out, f"results.{kind}") for kind in ("md", "csv", "json")}
    with open(paths["md"], "w") as handle:
        handle.write(f"## Main job: test loss at each method's validated lr\n\n{regime_label(settings)}. "
                     f"Command: `{settings.get('command', '')}` ({settings.get('date', '')}).\n\n")
        handle.write(markdown_table(rows))
        handle.write("\n## Learning-rate selection: final validation loss per lr (selection seed)\n\n")
        handle.write(lr_sweep_markdown(rows, runs, settings["seeds"][0]))
        variants = variants_markdown(rows, runs)
        if variants:
            handle.write("\n## One trained model evaluated as several variants (DyLoRA: each rank), test loss\n\n")
            handle.write(variants)
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["json"], "w") as handle:
        json.dump({"settings": settings, "summary": rows, "runs": runs}, handle, indent=1)
    return paths


def method_styles(count: int) -> list[dict]:
    """One (colour, marker, line style) per method: ten colours, then the same colours with other markers and dashes."""
    import matplotlib.pyplot as plt

    colours, markers, lines = plt.get_cmap("tab10").colors, "osD^v<>", ("-", "--", ":", "-.")
    return [{"color": colours[i % 10], "marker": markers[(i // 10) % len(markers)], "linestyle": lines[(i // 10) % 4]}
            for i in range(count)]


def write_plots(rows: list[dict], runs: list[dict], meta: dict, out: str) -> list[str]:
    """Validation curves at the chosen lr with seed bands, the lr sweep, time bars and memory bars as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok"]
    names = [row["method"] for row in ok]
    styles = method_styles(len(ok))
    selection_seed = meta["seeds"][0]
    title = regime_label(meta)
    paths = []

    figure, (curves, sweep) = plt.subplots(1, 2, figsize=(15, 6))
    shown = []
    for row, style in zip(ok, styles):
        at_lr = [run for run in runs if run["method"] == row["method"] and run.get("lr") == row["lr"]]
        steps, mean, low, high = _mean_curve(at_lr)
        curves.plot(steps, mean, label=f"{row['method']} (lr {row['lr']:g})", markevery=max(1, len(steps) // 8),
                    markersize=4, **style)
        curves.fill_between(steps, low, high, color=style["color"], alpha=0.15, linewidth=0)
        shown.extend(value for step, value in zip(steps, high) if step >= steps[-1] // 5)
        selection = sorted((run["lr"], run["validation_loss"]) for run in runs if run["method"] == row["method"]
                           and run["status"] == "ok" and run["seed"] == selection_seed
                           and math.isfinite(run["validation_loss"]))
        sweep.plot([lr for lr, _ in selection], [loss for _, loss in selection], label=row["method"], **style)
    if shown:
        curves.set_ylim(top=max(shown) + 0.05 * (max(shown) - min(shown) + 1e-3))
    curves.set_title("validation loss at the chosen lr: mean over seeds, band min..max (y from 20 % of the steps)",
                     fontsize=9)
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss (nats/byte)")
    sweep.set_xscale("log")
    sweep.set_title(f"final validation loss per peak learning rate (seed {selection_seed}; diverged runs left out)",
                    fontsize=9)
    sweep.set_xlabel("peak learning rate")
    sweep.set_ylabel("final validation loss (nats/byte)")
    for axis in (curves, sweep):
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    paths.append(save_figure(figure, out, "loss_curves.png"))

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    left.barh(names, [row["step_ms"] for row in ok], label="optimizer step")
    left.barh(names, [row["step_ms"] * row["refresh_share"] for row in ok], label="of which projector refresh")
    left.set_xlabel("ms per step (mean)")
    left.legend(fontsize=8)
    right.barh(names, [row["train_seconds"] for row in ok])
    right.set_xlabel("training wall time (s, forward + backward + step)")
    for axis in (left, right):
        axis.invert_yaxis()
    figure.suptitle(f"Time: {title}", fontsize=10)
    paths.append(save_figure(figure, out, "time.png"))

    figure, axis = plt.subplots(figsize=(9, 5.5))
    start = [0.0] * len(ok)
    for key in ("params", "grads", "state"):
        values = [row[f"{key}_mib"] for row in ok]
        axis.barh(names, values, left=start, label=key)
        start = [a + b for a, b in zip(start, values)]
    axis.invert_yaxis()
    axis.set_xlabel("MiB at peak (bytes of tensors)")
    axis.set_title(f"Memory: parameters + gradients + optimizer state\n{title}", fontsize=9)
    axis.legend()
    paths.append(save_figure(figure, out, "memory.png"))
    return paths


def _mean_curve(runs: list[dict]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(evaluation steps, validation loss at each averaged over the runs that finished, its minimum, its maximum)."""
    curves = [run["curve"] for run in runs if run["status"] == "ok"]
    steps = [step for step, _ in curves[0]]
    columns = [[curve[i][1] for curve in curves] for i in range(len(steps))]
    return (steps, [statistics.fmean(column) for column in columns], [min(column) for column in columns],
            [max(column) for column in columns])


def save_figure(figure, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
