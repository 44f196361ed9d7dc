"""The main job's mixture-of-experts size (benchmarks/models.py "moe", a tiny MixtralForCausalLM): its expert stacks
are 3-D parameters, GaLore+ projects them, the muon method leaves them to AdamW, and the job runs end to end."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks.finetune import main  # noqa: E402
from benchmarks.methods import ALL_METHODS, OptimSettings  # noqa: E402
from benchmarks.models import MODEL_SIZES, MOE_SIZES, build_model  # noqa: E402
from galore_plus.groups import plan_param_groups  # noqa: E402

SETTINGS = OptimSettings(1e-2, 0.0, rank=4, update_proj_gap=2, scale=0.25, lora_alpha=None, steps=2)


def expert_stacks(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.dim() == 3}


def test_moe_size_is_a_mixtral_with_expert_stacks_of_its_size():
    model = build_model("moe", 16, seed=0)
    hidden, layers, _, intermediate = MODEL_SIZES["moe"]
    experts, _ = MOE_SIZES["moe"]
    shapes = sorted(tuple(p.shape) for p in expert_stacks(model).values())
    assert shapes == sorted([(experts, 2 * intermediate, hidden), (experts, hidden, intermediate)] * layers)


def test_make_param_groups_projects_every_hidden_weight_of_the_moe_size():
    model = build_model("moe", 16, seed=0)
    placement = plan_param_groups(model, rank=4).placement
    hidden = {name: p for name, p in model.named_parameters()
              if p.dim() >= 2 and "embed_tokens" not in name and not name.startswith("lm_head")
              and not name.endswith("mlp.gate.weight")}
    assert expert_stacks(model) and set(expert_stacks(model)) <= set(hidden)
    assert all(placement[name] != "adamw" for name in hidden)
    assert all(placement[name] == "adamw" for name in placement if name.endswith("mlp.gate.weight"))


def test_muon_method_leaves_the_expert_stacks_to_adamw():
    model = build_model("moe", 16, seed=0)
    muon, adamw = ALL_METHODS["muon"].build(model, SETTINGS, 0).optimizers
    stacks = {id(p) for p in expert_stacks(model).values()}
    assert stacks and all(p.dim() == 2 for group in muon.param_groups for p in group["params"])
    assert stacks <= {id(p) for group in adamw.param_groups for p in group["params"]}


def test_main_job_trains_the_moe_size_with_the_stacks_projected(tmp_path):
    args = ["--model-size", "moe", "--regime", "pretrain", "--steps", "3", "--rank", "4", "--seq-len", "16",
            "--batch-size", "2", "--eval-every", "2", "--eval-windows", "4", "--update-proj-gap", "2", "--seeds", "0",
            "--lr", "1e-2", "--quiet", "--methods", "adamw", "galore_plus", "muon",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    runs = {run["method"]: run for run in main(args)["runs"]}
    assert all(run["status"] == "ok" for run in runs.values()), runs
    for run in runs.values():
        assert all(math.isfinite(loss) for loss in run["train_losses"]) and math.isfinite(run["test_loss"])
    # AdamW's two float32 moments of the expert stacks alone are more than GaLore+'s whole state
    stack_moments = 2 * 4 * sum(p.numel() for p in expert_stacks(build_model("moe", 16, seed=0)).values())
    assert runs["galore_plus"]["state_bytes"] < stack_moments < runs["adamw"]["state_bytes"]
