"""Smoke test of the adapter family in the main job (benchmarks/methods.py): each trains at a tiny size, DyLoRA
reports its test loss at several ranks, and AdaLoRA's regulariser and budget allocation run every step."""

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import galore_plus.adapters.adalora as adalora_module  # noqa: E402
from benchmarks.finetune import main  # noqa: E402
from benchmarks.methods import OptimSettings, adalora_schedule, method_sets  # noqa: E402

NEW = ["vera", "dvora", "hydra", "dylora", "adalora"]
STEPS = 12
TINY = ["--regime", "finetune", "--model-size", "tiny", "--steps", str(STEPS), "--pretrain-steps", "4", "--rank", "4",
        "--seq-len", "16", "--batch-size", "4", "--pretrain-batch-size", "2", "--eval-every", "6",
        "--eval-windows", "8", "--seeds", "0", "--lr", "1e-2", "--quiet"]


def test_the_adapter_set_holds_the_family():
    assert method_sets()["adapters"] == ["lora", "dora", *NEW]


def test_adalora_schedule_follows_the_run():
    settings = OptimSettings(1e-3, 0.0, rank=32, update_proj_gap=50, scale=0.25, lora_alpha=None, steps=150)
    assert adalora_schedule(settings) == {"target_rank": 21, "total_steps": 150, "warmup_steps": 15, "final_steps": 30}


def test_new_adapter_methods_train_and_report(tmp_path, monkeypatch):
    calls = {"allocate": [], "loss": 0}
    allocate, model_loss = adalora_module.allocate, adalora_module.AdaLoRALinear.model_loss.__func__

    def counted_allocate(layers, schedule, step):
        calls["allocate"].append(step)
        allocate(layers, schedule, step)

    def counted_loss(cls, layers):
        calls["loss"] += 1
        return model_loss(cls, layers)

    monkeypatch.setattr(adalora_module, "allocate", counted_allocate)
    monkeypatch.setattr(adalora_module.AdaLoRALinear, "model_loss", classmethod(counted_loss))
    result = main(TINY + ["--methods", *NEW, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    runs = {run["method"]: run for run in result["runs"]}
    for name in NEW:
        run = runs[name]
        assert run["status"] == "ok", run
        assert run["curve"][-1][1] < run["curve"][0][1], (name, run["curve"])  # validation loss went down
        assert run["trainable_bytes"] > 0 and math.isfinite(run["test_loss"])
    assert calls["allocate"] == list(range(1, STEPS + 1))  # once per step, counted from 1
    assert calls["loss"] == STEPS
    variants = runs["dylora"]["variant_test_losses"]
    assert list(variants) == ["rank 1", "rank 2", "rank 4"]
    assert variants["rank 4"] == pytest.approx(runs["dylora"]["test_loss"])  # full rank is the default evaluation
    assert len(set(variants.values())) == 3
    assert all(runs[name]["variant_test_losses"] == {} for name in NEW if name != "dylora")
    assert "| dylora | rank 2 |" in (tmp_path / "out" / "results.md").read_text()
    # AdaLoRA's importance averages (one copy each of Ī and Ū per adapter parameter) count as training state until
    # its final phase frees them: at the peak, Adam's two moments plus those two; at the end, the moments only
    adalora = runs["adalora"]
    assert adalora["peak_bytes"]["state"] == pytest.approx(2 * adalora["state_bytes"], rel=0.01)
    assert runs["hydra"]["peak_bytes"]["state"] == runs["hydra"]["state_bytes"]
