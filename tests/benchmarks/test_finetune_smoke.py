"""Smoke test of the main job (benchmarks/finetune.py) at a tiny size: lr selection on validation, both regimes,
bad input, resume, and the method registry."""

import importlib.util
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks.finetune import build_parser, main  # noqa: E402
from benchmarks.measure import RefreshTimer, tensor_bytes  # noqa: E402
from benchmarks.methods import ALL_METHODS, MethodSpec, galore_plus_method, unavailable_reason  # noqa: E402
from benchmarks.report import add_gaps, choose_lr  # noqa: E402

TINY = ["--regime", "finetune", "--model-size", "tiny", "--steps", "4", "--pretrain-steps", "4", "--rank", "4",
        "--seq-len", "16", "--batch-size", "2", "--pretrain-batch-size", "2", "--eval-every", "2", "--eval-windows", "4",
        "--update-proj-gap", "2", "--seeds", "0", "--lr-grid", "1e-3", "1e-2", "--widen", "0", "--quiet"]
ALWAYS_AVAILABLE = ("adamw", "galore", "galore_plus", "galore_plus_res0")


def tiny_args(tmp_path, *extra):
    return TINY + ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    return folder, main(tiny_args(folder, "--methods", "all", "--seeds", "0", "1"))


def test_every_available_method_gives_finite_losses(tiny_run):
    _, result = tiny_run
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == set(ALL_METHODS)
    for name in ALWAYS_AVAILABLE:
        assert rows[name]["status"] == "ok", rows[name]
    for row in rows.values():
        assert row["status"] in ("ok", "unavailable"), row
        if row["status"] == "unavailable":
            assert row["note"], "an unavailable method must say why"
            continue
        assert math.isfinite(row["test_loss"]) and row["test_loss"] > 0
        assert row["peak_mib"] > 0 and row["trainable_mib"] > 0
    for run in result["runs"]:
        if run["status"] == "ok":
            assert all(math.isfinite(loss) for loss in run["train_losses"])
            assert all(math.isfinite(loss) for _, loss in run["curve"])


def test_result_files_exist_and_agree(tiny_run):
    folder, result = tiny_run
    out = folder / "out"
    for name in ("results.md", "results.csv", "results.json", "loss_curves.png", "time.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved["summary"]] == [row["method"] for row in result["rows"]]
    table = (out / "results.md").read_text()
    assert all(f"| {row['method']} |" in table for row in result["rows"])


def test_memory_accounting_orders_methods(tiny_run):
    _, result = tiny_run
    rows = {row["method"]: row for row in result["rows"]}
    # the low-rank moments of GaLore are smaller than AdamW's full moments; adapters train fewer bytes
    assert rows["galore"]["state_mib"] < rows["adamw"]["state_mib"]
    if rows["lora"]["status"] == "ok":
        assert rows["lora"]["trainable_mib"] < rows["adamw"]["trainable_mib"]


def test_resume_keeps_finished_runs(tmp_path):
    first = main(tiny_args(tmp_path, "--methods", "adamw", "galore"))
    chosen = {row["method"]: row for row in first["rows"]}["adamw"]["lr"]
    path = tmp_path / "out" / "runs" / f"adamw__lr{chosen:g}__seed0.json"
    run = json.loads(path.read_text())
    run["test_loss"] = 1.25  # a marker: a resumed run must report the saved value, not retrain
    path.write_text(json.dumps(run))
    resumed = main(tiny_args(tmp_path, "--methods", "adamw", "galore", "--resume"))
    rows = {row["method"]: row for row in resumed["rows"]}
    assert rows["adamw"]["test_loss"] == 1.25
    assert rows["galore"]["test_loss"] == {r["method"]: r for r in first["rows"]}["galore"]["test_loss"]


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    main(tiny_args(tmp_path, "--methods", "adamw"))
    with pytest.raises(SystemExit):
        main(tiny_args(tmp_path, "--methods", "adamw", "--resume", "--weight-decay", "0.5"))
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--methods", "adamw", "sgd_magic"], "unknown method 'sgd_magic'"),
    (["--rank", "33"], "--rank 33 is larger than model size 'tiny' allows"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        main(tiny_args(tmp_path) + extra)
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        main(TINY + ["--out", str(blocker / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert "--out" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cache")


def test_tensor_bytes_counts_shared_storage_once_and_follows_objects():
    class Holder:
        def __init__(self, tensor):
            self.tensor = tensor

    base = torch.zeros(10, 4)
    state = {"a": base, "view": base[:2], "holder": Holder(torch.zeros(3, dtype=torch.float64)), "n": 3}
    assert tensor_bytes(state) == 10 * 4 * 4 + 3 * 8


def test_refresh_timer_counts_refreshes_and_restores_the_projector():
    import galore_plus.step.refresh as refresh_module
    from galore_plus import GaLorePlusAdamW

    original = refresh_module.compute_basis
    weight = torch.nn.Parameter(torch.randn(6, 5))
    optimizer = GaLorePlusAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 2}])
    timer = RefreshTimer(torch.device("cpu"))
    with timer.patched():
        for _ in range(5):
            weight.grad = torch.randn(6, 5)
            optimizer.step()
    assert timer.calls == 3 and timer.seconds > 0
    assert refresh_module.compute_basis is original


def test_several_seeds_give_mean_and_spread(tmp_path):
    result = main(tiny_args(tmp_path, "--methods", "adamw", "--seeds", "0", "1"))
    (row,) = result["rows"]
    losses = [run["test_loss"] for run in result["runs"] if run["lr"] == row["lr"]]
    assert row["seeds"] == 2 and len(losses) == 2
    assert row["test_loss"] == pytest.approx(sum(losses) / 2)
    assert row["test_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
    assert " ± " in (tmp_path / "out" / "results.md").read_text()


def test_lr_is_chosen_on_validation_and_the_other_seeds_run_there(tiny_run):
    _, result = tiny_run
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        runs = [run for run in result["runs"] if run["method"] == row["method"]]
        selection = [run for run in runs if run["seed"] == 0]
        assert sorted(run["lr"] for run in selection) == [1e-3, 1e-2]
        assert row["lr"] == min(selection, key=lambda run: run["validation_loss"])["lr"]
        (other,) = [run for run in runs if run["seed"] == 1]
        assert other["lr"] == row["lr"]
        at_chosen = [run["test_loss"] for run in runs if run["lr"] == row["lr"]]
        assert row["test_loss"] == pytest.approx(sum(at_chosen) / 2)


def test_choose_lr_uses_validation_never_test_and_skips_diverged_runs():
    runs = [
        {"lr": 1e-3, "status": "ok", "validation_loss": 2.0, "test_loss": 1.0},
        {"lr": 1e-2, "status": "ok", "validation_loss": 1.5, "test_loss": 3.0},
        {"lr": 3e-2, "status": "ok", "validation_loss": float("nan"), "test_loss": 0.1},
        {"lr": 1e-1, "status": "failed", "reason": "boom"},
    ]
    assert choose_lr(runs) == 1e-2
    assert choose_lr(runs[2:]) is None


def test_gap_to_adamw_pairs_seeds():
    runs = [{"method": m, "seed": seed, "lr": 1.0, "status": "ok", "test_loss": loss}
            for m, seed, loss in [("adamw", 0, 2.0), ("adamw", 1, 3.0), ("other", 0, 2.5), ("other", 1, 3.5)]]
    rows = [{"method": "adamw", "status": "ok", "lr": 1.0}, {"method": "other", "status": "ok", "lr": 1.0}]
    add_gaps(rows, runs)
    assert rows[1]["gap_to_adamw"] == pytest.approx(0.5)
    assert rows[1]["gap_to_adamw_std"] == pytest.approx(0.0)  # paired: the seed-to-seed spread cancels


def test_single_lr_keeps_the_one_lr_behaviour(tmp_path):
    argv = [a for a in tiny_args(tmp_path, "--methods", "adamw", "galore") if a not in ("--lr-grid", "1e-3", "1e-2")]
    result = main(argv + ["--lr", "0.003"])
    assert {run["lr"] for run in result["runs"]} == {0.003}
    assert all(row["lr"] == 0.003 for row in result["rows"])


def test_pretrain_regime_trains_from_scratch_without_the_cache(tmp_path):
    from benchmarks.finetune import HELDOUT_BYTES
    from benchmarks.models import build_model, heldout_loss
    from benchmarks.text_data import eval_windows, stdlib_source_splits

    result = main(tiny_args(tmp_path, "--methods", "adamw", "galore", "--regime", "pretrain"))
    # Independently: the seed-0 random initialisation on the stdlib sources' validation windows (the files after
    # the 4 x 2 windows of 17 bytes the run trains on). A tiny model "pre-trained" for 4 steps also starts near
    # log(257), so only this tells from scratch from the cache.
    validation = stdlib_source_splits(4 * 2 * 17, HELDOUT_BYTES)[1]
    from_scratch = heldout_loss(build_model("tiny", 16, seed=0), eval_windows(validation, 16, 4), 32)
    for run in result["runs"]:
        start = run["curve"][0][1]
        assert start == pytest.approx(from_scratch, rel=1e-6), start
        assert abs(start - math.log(257)) < 0.3, start  # a random byte model starts near uniform
        assert run["validation_loss"] < start
    assert not os.listdir(tmp_path / "cache")


def test_help_states_each_default_once():
    text = build_parser().format_help()
    entries = text.split("\n  -")[1:]
    assert len(entries) > 20
    for entry in entries:
        assert entry.count("(default") <= 1, entry
        assert "None" not in entry and "[" not in entry.split("(default")[-1], entry


def test_missing_package_or_group_key_makes_a_method_unavailable():
    missing = MethodSpec("x", "needs a package", build=None, requires=("no_such_package_abc",))
    assert "no_such_package_abc is not installed" in unavailable_reason(missing)
    unknown_key = galore_plus_method("y", "needs a key", no_such_group_key=True)
    assert "no_such_group_key" in unavailable_reason(unknown_key)
    bad_value = galore_plus_method("z", "bad value", residual_mode="nonsense")
    assert "residual_mode" in unavailable_reason(bad_value)
    assert unavailable_reason(ALL_METHODS["galore_plus"]) is None


def test_resume_extends_the_lr_grid_keeping_finished_runs(tmp_path):
    argv = [a for a in tiny_args(tmp_path, "--methods", "adamw") if a not in ("--lr-grid", "1e-3", "1e-2")]
    main(argv + ["--lr-grid", "1e-3"])
    path = tmp_path / "out" / "runs" / "adamw__lr0.001__seed0.json"
    run = json.loads(path.read_text())
    run["validation_loss"] = 0.5  # a marker that also wins the selection
    path.write_text(json.dumps(run))
    result = main(argv + ["--lr-grid", "1e-3", "1e-2", "--resume"])
    assert sorted(run["lr"] for run in result["runs"]) == [1e-3, 1e-2]
    assert result["rows"][0]["lr"] == 1e-3


def test_default_grids_differ_by_regime_and_method():
    from benchmarks.finetune import DEFAULT_LR_GRID, lr_grid

    args = build_parser().parse_args(["--regime", "pretrain"])
    assert lr_grid(args, ALL_METHODS["adamw"]) == DEFAULT_LR_GRID["pretrain"]
    assert lr_grid(args, ALL_METHODS["galore_plus"]) == (3e-3, 1e-2, 3e-2)
    assert lr_grid(args, ALL_METHODS["muon"]) == (3e-3, 1e-2, 3e-2)
    assert lr_grid(build_parser().parse_args(["--regime", "finetune"]), ALL_METHODS["galore_plus"]) == \
        DEFAULT_LR_GRID["finetune"]
    assert lr_grid(build_parser().parse_args(["--regime", "pretrain", "--lr", "0.5"]), ALL_METHODS["galore_plus"]) == (0.5,)


def test_report_only_trains_nothing_and_lists_missing_runs(tmp_path):
    main(tiny_args(tmp_path, "--methods", "adamw"))
    runs_folder = tmp_path / "out" / "runs"
    before = sorted(os.listdir(runs_folder))
    result = main(tiny_args(tmp_path, "--methods", "adamw", "galore", "--seeds", "0", "1", "--report-only"))
    assert sorted(os.listdir(runs_folder)) == before
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["adamw"]["status"] == "ok" and rows["adamw"]["seeds"] == 1  # seed 1 was never run
    assert rows["galore"]["status"] == "not run" and "lr 0.001 seed 0" in rows["galore"]["note"]


def test_peers_run_from_their_packages_beside_ours(tiny_run):
    _, result = tiny_run
    rows = {row["method"]: row for row in result["rows"]}
    ours = ("galore_plus_apollo", "galore_plus_apollo_mini")
    peers = ("apollo", "apollo_mini") if importlib.util.find_spec("apollo_torch") else ()
    for name in ours + peers + (("galore_plus_4bit_bases",) if importlib.util.find_spec("bitsandbytes") else ()):
        assert rows[name]["status"] == "ok", rows[name]
    if rows["q_galore"]["status"] == "unavailable":  # q-galore-torch 1.0 with bitsandbytes 0.50 on a CPU: it was tried
        assert "not installed" in rows["q_galore"]["note"] or "cannot step here" in rows["q_galore"]["note"]


def test_a_failing_probe_makes_a_method_unavailable_with_its_reason():
    probed = MethodSpec("p", "tried first", build=None, probe=lambda: "it raises KeyError here")
    assert unavailable_reason(probed) == "it raises KeyError here"
    assert unavailable_reason(MethodSpec("q", "tried first", build=None, probe=lambda: None)) is None


def test_muon_row_is_torch_muon_on_hidden_matrices_and_adamw_on_the_rest():
    from benchmarks.methods import OptimSettings, hidden_matrices
    from benchmarks.models import build_model, next_byte_loss

    settings = OptimSettings(1e-2, 0.0, rank=4, update_proj_gap=2, scale=0.25, lora_alpha=None, steps=3)
    ours, reference = build_model("tiny", 16, seed=0), build_model("tiny", 16, seed=0)
    pair = ALL_METHODS["muon"].build(ours, settings, 0)
    hidden, rest = hidden_matrices(reference)
    assert hidden and all(p.ndim == 2 for p in hidden) and any(p.ndim == 2 for p in rest)  # embeddings, head stay
    separate = [torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.0)]
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizers in ((ours, [pair]), (reference, separate)):
            next_byte_loss(model, tokens).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(ours.parameters()), next(build_model("tiny", 16, seed=0).parameters()))
    assert len(pair.state) == len(list(ours.parameters()))


def test_parallel_jobs_give_the_same_runs_as_one_process(tmp_path):
    extra = ["--methods", "adamw", "galore_plus", "--regime", "pretrain", "--cache-dir", str(tmp_path / "cache")]
    one = main(TINY + ["--out", str(tmp_path / "one")] + extra)
    two = main(TINY + ["--out", str(tmp_path / "two")] + extra + ["--jobs", "2"])
    key = lambda run: (run["method"], run["lr"], run["seed"])  # noqa: E731
    assert sorted(map(key, one["runs"])) == sorted(map(key, two["runs"]))
    by_key = {key(run): run for run in two["runs"]}
    for run in one["runs"]:
        assert run["test_loss"] == by_key[key(run)]["test_loss"] and run["curve"] == by_key[key(run)]["curve"]
