"""GaLorePlusTrainer: per-layer steps under transformers.Trainer, its hyperparameters and no-decay rule, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from galore_plus import GaLorePlusAdamW, make_param_groups

transformers = pytest.importorskip("transformers")

from galore_plus.hf import GaLorePlusTrainer  # noqa: E402
from galore_plus.per_layer import enable_per_layer_steps  # noqa: E402
from support import MAX_STEPS, STOP_AT, stop_after, tiny_dataset, tiny_llama  # noqa: E402

GALORE = dict(rank=4, update_proj_gap=2, residual_ratio=0.05, residual_warmup=1)


def arguments(output_dir: Path, **overrides) -> transformers.TrainingArguments:
    options = dict(
        output_dir=str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.1, max_grad_norm=0.0, save_strategy="steps", save_steps=STOP_AT, logging_strategy="no",
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**options, **overrides})


def train(output_dir: Path, per_layer: bool, stop_at: int | None = None, resume: str | None = None):
    model = tiny_llama()
    trainer = GaLorePlusTrainer(model=model, args=arguments(output_dir), train_dataset=tiny_dataset(), galore=GALORE,
                                per_layer=per_layer, seed=1, callbacks=[stop_after(stop_at)] if stop_at else [])
    trainer.train(resume_from_checkpoint=resume)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, trainer


def test_per_layer_steps_under_the_trainer_equal_ordinary_steps_and_resume_exactly(tmp_path):
    ordinary, _ = train(tmp_path / "ordinary", per_layer=False)
    per_layer, trainer = train(tmp_path / "per_layer", per_layer=True, stop_at=None)
    assert trainer.per_layer_steps is not None and trainer.state.global_step == MAX_STEPS
    initial = dict(tiny_llama().named_parameters())
    for name, expected in ordinary.items():
        assert not torch.equal(expected, initial[name]), name
        assert torch.equal(per_layer[name], expected), name
    train(tmp_path / "interrupted", per_layer=True, stop_at=STOP_AT)
    resumed, _ = train(tmp_path / "interrupted", per_layer=True, resume=str(tmp_path / "interrupted" / f"checkpoint-{STOP_AT}"))
    for name, expected in ordinary.items():
        assert torch.equal(resumed[name], expected), name


def test_hyperparameters_and_the_trainers_no_decay_rule_reach_every_group(tmp_path):
    model = tiny_llama()
    args = arguments(tmp_path, learning_rate=3e-3, weight_decay=0.05, adam_beta1=0.8, adam_epsilon=1e-7)
    trainer = GaLorePlusTrainer(model=model, args=args, train_dataset=tiny_dataset(), galore=GALORE)
    optimizer = trainer.create_optimizer()
    plain = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=tiny_dataset())
    reference = plain.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    reference_names = {id(p): n for n, p in plain.model.named_parameters()}
    decay_of = {reference_names[id(p)]: g["weight_decay"] for g in reference.param_groups for p in g["params"]}
    assert set(decay_of.values()) == {0.0, 0.05}
    seen = 0
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (3e-3, (0.8, 0.999), 1e-7)
        for param in group["params"]:
            assert group["weight_decay"] == decay_of[names[id(param)]], names[id(param)]
            seen += 1
    assert seen == len(decay_of)
    assert any("rank" in group for group in optimizer.param_groups)


def test_per_layer_with_accumulation_and_clipping_steps_once_per_update(tmp_path):
    """gradient_accumulation_steps=2 and max_grad_norm=1: the weights, Adam's step count and the LR schedule
    advance once per update (4 micro-batches of 2 rows -> 2 updates), and the logged grad_norm is clipping's."""
    model = tiny_llama()
    logged = []

    class Record(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                logged.append(logs["grad_norm"])

    args = arguments(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_grad_norm=1.0, save_strategy="no", logging_strategy="steps", logging_steps=1,
                     lr_scheduler_type="linear")
    trainer = GaLorePlusTrainer(model=model, args=args, train_dataset=tiny_dataset(), galore=GALORE, per_layer=True,
                                seed=1, callbacks=[Record()])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    assert trainer.per_layer_steps.accumulation_steps == 2 and trainer.state.global_step == 2
    optimizer = trainer.per_layer_steps.optimizer
    steps = {state["step"] if isinstance(state["step"], int) else int(state["step"]) for state in optimizer.state.values()}
    assert steps == {2}
    assert trainer.lr_scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == 0.0  # linear decay to 0 at step 2
    assert len(logged) == 2 and all(math.isfinite(norm) and norm > 0 for norm in logged)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all() and not torch.equal(param, before[name]), name


def test_a_built_per_layer_optimizer_without_accumulation_is_refused_with_accumulating_arguments(tmp_path):
    model = tiny_llama()
    optimizer = GaLorePlusAdamW(make_param_groups(model, **GALORE), lr=1e-2, seed=1)
    enable_per_layer_steps(optimizer)
    trainer = GaLorePlusTrainer(model=model, args=arguments(tmp_path, gradient_accumulation_steps=2),
                                train_dataset=tiny_dataset(), optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="need enable_per_layer_steps\\(optimizer, accumulation_steps=2\\)"):
        trainer.create_optimizer()


def test_a_built_per_layer_optimizer_trains_under_the_trainer(tmp_path):
    model = tiny_llama()
    optimizer = GaLorePlusAdamW(make_param_groups(model, **GALORE), lr=1e-2, seed=1)
    enable_per_layer_steps(optimizer)
    trainer = GaLorePlusTrainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=tiny_dataset(),
                                optimizers=(optimizer, None))
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_missing_rank_and_conflicting_arguments_are_refused(tmp_path):
    args = arguments(tmp_path)
    with pytest.raises(ValueError, match=r"needs galore=dict\(rank="):
        GaLorePlusTrainer(model=tiny_llama(), args=args, train_dataset=tiny_dataset(), galore={"update_proj_gap": 2})
    with pytest.raises(ValueError, match="lr, weight_decay in galore=... come from TrainingArguments"):
        GaLorePlusTrainer(model=tiny_llama(), args=args, train_dataset=tiny_dataset(),
                          galore={"rank": 4, "lr": 1e-3, "weight_decay": 0.0})
    with pytest.raises(ValueError, match="instead of optimizer_cls_and_kwargs"):
        GaLorePlusTrainer(model=tiny_llama(), args=args, train_dataset=tiny_dataset(), galore=GALORE,
                          optimizer_cls_and_kwargs=(GaLorePlusAdamW, {"lr": 1e-3}))


def test_a_kwargs_dict_reused_for_a_second_trainer_warns_that_it_became_plain_adamw(tmp_path):
    model = tiny_llama()
    kwargs = {"params": make_param_groups(model, rank=4), "lr": 1e-2}
    for attempt in range(2):
        trainer = transformers.Trainer(model=model, args=arguments(tmp_path), train_dataset=tiny_dataset(),
                                       optimizer_cls_and_kwargs=(GaLorePlusAdamW, kwargs))
        if attempt == 0:
            trainer.create_optimizer()
            continue
        with pytest.warns(UserWarning, match="no parameter group with 'rank'.*reused for a second Trainer"):
            trainer.create_optimizer()
