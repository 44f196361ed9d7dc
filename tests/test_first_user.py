"""A scripted first-user run: what a new user does with GPT-2, LLaMA (grouped-query) and BERT configs.

Correct setups run with warnings turned into errors (so nothing falls back to AdamW silently); each
wrong input a user plausibly makes is answered by galore_plus itself, at once, with an error that
says what to do, or by a warning that names the weights and the memory at stake.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from galore_plus import GaLorePlusAdamW, make_param_groups
from galore_plus.groups import OUTPUT_HEAD_NAMES, plan_param_groups
from galore_plus.memory import estimate_memory
from galore_plus.per_layer import enable_per_layer_steps
from galore_plus.presets import APOLLO

transformers = pytest.importorskip("transformers")

from galore_plus.hf import GaLorePlusTrainer  # noqa: E402
from support import stop_after, tiny_dataset  # noqa: E402


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=16))


def llama_gqa():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16))


def bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16))


MODELS = {"gpt2": gpt2, "llama_gqa": llama_gqa, "bert": bert}
OPTIONS = dict(rank=4, update_proj_gap=2, residual_ratio=0.012, residual_warmup=1)


def built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", MODELS)
def test_plain_loop_projects_every_linear_weight_without_any_warning_and_the_estimate_is_exact(name):
    model = built(name)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_param_groups(model, **OPTIONS)
        groups = make_param_groups(model, **OPTIONS)
        optimizer = GaLorePlusAdamW(groups, lr=1e-2)
        ids = batch()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    linear = [f"{module_name}.weight" for module_name, module in model.named_modules()
              if (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
              and module_name.rsplit(".", 1)[-1] not in OUTPUT_HEAD_NAMES]
    assert linear and all(plan.placement[weight] != "adamw" for weight in linear)
    assert any(group.get("residual_ratio", 0) > 0 for group in groups)
    state_bytes = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert estimate_memory(groups).optimizer_state == state_bytes
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(initial[linear[0]], dict(model.named_parameters())[linear[0]])


def test_trainer_with_per_layer_steps_saves_and_resumes_without_warnings(tmp_path):
    def run(stop_at=None, resume=None):
        model = built("gpt2")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, max_grad_norm=0,
            save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = GaLorePlusTrainer(model=model, args=args, train_dataset=tiny_dataset(), galore=OPTIONS,
                                    per_layer=True, callbacks=[stop_after(stop_at)] if stop_at else [])
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            trainer.train(resume_from_checkpoint=resume)
        return trainer

    assert run(stop_at=2).state.global_step == 2
    at_checkpoint = pytest.importorskip("safetensors.torch").load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    resumed = run(resume=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for name, param in resumed.model.named_parameters():  # the 2 steps after resuming moved every parameter
        if name in at_checkpoint:
            assert (param.detach() - at_checkpoint[name]).abs().mean() > 1e-2 * 0.25 / 50, name  # lr * scale / 50


def galore_torch_state() -> dict:
    galore_torch = pytest.importorskip("galore_torch")
    model = built("llama_gqa")
    groups = [{"params": [model.model.layers[0].mlp.up_proj.weight], "rank": 4, "update_proj_gap": 2, "scale": 0.25,
               "proj_type": "std"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = galore_torch.GaLoreAdamW(groups)
    model.model.layers[0].mlp.up_proj.weight.grad = torch.ones(48, 32)
    theirs.step()
    return theirs.state_dict()


def rank_16_state() -> dict:
    weight = torch.nn.Parameter(torch.randn(48, 32))
    optimizer = GaLorePlusAdamW([{"params": [weight], "rank": 16}])
    weight.grad = torch.randn(48, 32)
    optimizer.step()
    return optimizer.state_dict()


def one_weight_optimizer(rank: int) -> GaLorePlusAdamW:
    return GaLorePlusAdamW([{"params": [torch.nn.Parameter(torch.randn(48, 32))], "rank": rank}])


def reused_trainer_kwargs(tmp_path):
    model = built("llama_gqa")
    kwargs = {"params": make_param_groups(model, rank=4), "lr": 1e-2}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    for _ in range(2):
        trainer = transformers.Trainer(model=model, args=args, optimizer_cls_and_kwargs=(GaLorePlusAdamW, kwargs))
        trainer.create_optimizer()


WRONG_INPUTS = {
    "misspelled target module": (lambda _: make_param_groups(built("llama_gqa"), rank=4, target_modules=["q_proj", "v_prj"]),
                                 ValueError, "did you mean 'v_proj'?"),
    "target module matching nothing": (lambda _: make_param_groups(built("bert"), rank=4, target_modules=["nothing"]),
                                       ValueError, "matches no nn.Linear or Conv1D module"),
    "head count not dividing rows": (lambda _: make_param_groups(built("llama_gqa"), rank=4, num_heads=3),
                                     ValueError, "pass the model's head counts as num_heads="),
    "rank as a string": (lambda _: make_param_groups(built("gpt2"), rank="16"), TypeError, "rank must be an int"),
    "misspelled group key": (lambda _: GaLorePlusAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "rank": 2,
                                                         "update_proj_gaps": 10}]),
                             ValueError, "did you mean 'update_proj_gap'?"),
    "string lr from a YAML file": (lambda _: GaLorePlusAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 8))],
                                                               "rank": 2, "lr": "1e-3"}]),
                                   TypeError, "param group 0, key 'lr': must be a number"),
    "rank given to the constructor": (lambda _: GaLorePlusAdamW(built("gpt2").parameters(), rank=16),
                                      TypeError, "'rank' is a parameter-group key"),
    "galore_torch checkpoint": (lambda _: one_weight_optimizer(4).load_state_dict(galore_torch_state()),
                                ValueError, "not a GaLorePlusAdamW checkpoint"),
    "rank-16 checkpoint into rank 8": (lambda _: one_weight_optimizer(8).load_state_dict(rank_16_state()),
                                       ValueError, "the checkpoint was saved with rank=16"),
    "per-layer accumulation with APOLLO": (lambda _: enable_per_layer_steps(GaLorePlusAdamW(
        make_param_groups(built("gpt2"), rank=4, **APOLLO)), accumulation_steps=2), ValueError, "key 'update_rule'"),
}


@pytest.mark.parametrize("case", WRONG_INPUTS)
def test_wrong_inputs_get_an_immediate_error_from_galore_plus_saying_what_to_do(case, tmp_path):
    action, error, words = WRONG_INPUTS[case]
    with pytest.raises(error) as info:
        action(tmp_path)
    assert words in str(info.value)
    assert "galore_plus" in str(info.traceback[-1].path), "raised by galore_plus's own check, not a late crash"


WARNED_INPUTS = {
    "no projected group": (lambda _: GaLorePlusAdamW(built("bert").parameters()),
                           r"plain AdamW: the moments of its \d+ 2-D weights \([\d.]+ KiB\).*make_param_groups"),
    "kwargs dict reused for a second Trainer": (reused_trainer_kwargs, "reused for a second Trainer"),
    "rank as large as the projected side": (lambda _: one_weight_optimizer(32), "saves no memory"),
    "weights too small for the rank": (lambda _: make_param_groups(built("llama_gqa"), rank=32),
                                       r"are not projected .* full-size moments \([\d.]+ KiB\)"),
}


@pytest.mark.parametrize("case", WARNED_INPUTS)
def test_fallbacks_that_can_run_warn_naming_what_is_lost(case, tmp_path):
    action, pattern = WARNED_INPUTS[case]
    with pytest.warns(UserWarning, match=pattern):
        action(tmp_path)


def test_residual_without_cross_head_is_kept_not_dropped():
    groups = make_param_groups(built("llama_gqa"), rank=4, cross_head=False, residual_ratio=0.012)
    assert [group["name"] for group in groups if group.get("residual_ratio") == 0.012] == ["randomized_residual"]


def test_memory_command_line_answers_a_user_error_with_one_line_and_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "galore_plus.memory", "--config", str(tmp_path / "missing.json")],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("python -m galore_plus.memory: error: --config")
