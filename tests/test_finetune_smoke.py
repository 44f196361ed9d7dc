"""Smoke test of the main job (benchmarks/finetune.py) at a tiny size, plus its bad-input and resume paths."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks.finetune import main  # noqa: E402
from benchmarks.measure import RefreshTimer, tensor_bytes  # noqa: E402
from benchmarks.methods import ALL_METHODS  # noqa: E402

TINY = ["--model-size", "tiny", "--steps", "4", "--pretrain-steps", "4", "--rank", "4", "--seq-len", "16",
        "--batch-size", "2", "--pretrain-batch-size", "2", "--pretrain-bytes", "20000", "--eval-every", "2",
        "--eval-windows", "4", "--update-proj-gap", "2", "--quiet"]
ALWAYS_AVAILABLE = ("adamw", "galore", "galore_plus", "galore_plus_res0")


def tiny_args(tmp_path, *extra):
    return TINY + ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    return folder, main(tiny_args(folder))


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
        assert math.isfinite(row["heldout_loss"]) and row["heldout_loss"] > 0
        assert row["peak_mib"] > 0 and row["trainable_mib"] > 0
    for run in result["runs"]:
        if run["status"] == "ok":
            assert all(math.isfinite(loss) for loss in run["train_losses"])
            assert all(math.isfinite(loss) for _, loss in run["curve"])


def test_result_files_exist_and_agree(tiny_run):
    folder, result = tiny_run
    out = folder / "out"
    for name in ("results.md", "results.csv", "results.json", "loss_curves.png", "time.png", "memory.png", "ablation.png"):
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
    path = tmp_path / "out" / "runs" / "adamw__seed0.json"
    run = json.loads(path.read_text())
    run["heldout_loss"] = 1.25  # a marker: a resumed run must report the saved value, not retrain
    path.write_text(json.dumps(run))
    resumed = main(tiny_args(tmp_path, "--methods", "adamw", "galore", "--resume"))
    rows = {row["method"]: row for row in resumed["rows"]}
    assert rows["adamw"]["heldout_loss"] == 1.25
    assert rows["galore"]["heldout_loss"] == {r["method"]: r for r in first["rows"]}["galore"]["heldout_loss"]


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    main(tiny_args(tmp_path, "--methods", "adamw"))
    with pytest.raises(SystemExit):
        main(tiny_args(tmp_path, "--methods", "adamw", "--resume", "--lr", "0.5"))
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
    import galore_plus.refresh as refresh_module
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
    losses = [run["heldout_loss"] for run in result["runs"]]
    (row,) = result["rows"]
    assert row["seeds"] == 2 and len(losses) == 2
    assert row["heldout_loss"] == pytest.approx(sum(losses) / 2)
    assert row["heldout_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
    assert " ± " in (tmp_path / "out" / "results.md").read_text()
