"""GaLorePlusAdamW in transformers.Trainer: train -> checkpoint -> resume equals an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from galore_plus import GaLorePlusAdamW, make_param_groups

transformers = pytest.importorskip("transformers")
load_file = pytest.importorskip("safetensors.torch").load_file

from support import MAX_STEPS, STOP_AT, stop_after, tiny_dataset, tiny_llama  # noqa: E402


def training_args(output_dir: Path) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=STOP_AT, logging_strategy="no", report_to=[], use_cpu=True,
        seed=0, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )


def galore_optimizer(model: torch.nn.Module) -> GaLorePlusAdamW:
    return GaLorePlusAdamW(make_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, seed=1)


def train(output_dir: Path, stop_at: int | None = None, resume: str | None = None) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    callbacks = [stop_after(stop_at)] if stop_at else []
    trainer = transformers.Trainer(
        model=model, args=training_args(output_dir), train_dataset=tiny_dataset(),
        optimizers=(galore_optimizer(model), None), callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path):
    uninterrupted = train(tmp_path / "straight")
    train(tmp_path / "interrupted", stop_at=STOP_AT)
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{STOP_AT}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("projector" in state for state in saved["state"].values())
    at_checkpoint = load_file(checkpoint / "model.safetensors")
    resumed = train(tmp_path / "interrupted", resume=str(checkpoint))
    for name, expected in uninterrupted.items():  # the 3 steps after the checkpoint moved every parameter
        assert (resumed[name] - at_checkpoint[name]).abs().mean() > 1e-2 * 0.25 / 50, name  # lr * default scale / 50
        assert torch.equal(resumed[name], expected), name


def test_optimizer_cls_and_kwargs_builds_the_galore_groups(tmp_path):
    model = tiny_llama()
    kwargs = {"params": make_param_groups(model, rank=4), "lr": 1e-2, "seed": 1}
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(),
        optimizer_cls_and_kwargs=(GaLorePlusAdamW, kwargs),
    )
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer, GaLorePlusAdamW)
    projectors = {group.get("projector") for group in trainer.optimizer.param_groups}
    assert {"cross_head", "randomized", None} <= projectors


class GaLorePlusFactory:
    """An optimizer factory for ``optimizer_cls_and_kwargs``: the Trainer calls it with the model it trains."""

    def __call__(self, model: torch.nn.Module, **kwargs) -> GaLorePlusAdamW:
        return GaLorePlusAdamW(make_param_groups(model, rank=4), **kwargs)


def test_an_optimizer_factory_builds_the_groups_from_the_trainers_model(tmp_path):
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(),
        optimizer_cls_and_kwargs=(GaLorePlusFactory, {"lr": 1e-2, "seed": 1}),
    )
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer, GaLorePlusAdamW)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-2
