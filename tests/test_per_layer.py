"""Per-layer steps from gradient hooks: same result as optimizer.step(), schedulers, resume, loud misuse."""


import pytest
import torch
from torch import nn

from galore_plus import GaLorePlusAdamW
from galore_plus.per_layer import ConsumedGradient, enable_per_layer_steps
from support import TinyNet, assert_same_parameters, resumed, weights_only_round_trip


def make(bits: int = 32) -> tuple[TinyNet, GaLorePlusAdamW]:
    torch.manual_seed(0)
    model = TinyNet()
    projected = [model.up.weight, model.down.weight]
    plain = [p for p in model.parameters() if all(p is not q for q in projected)]
    opt = GaLorePlusAdamW(
        [{"params": plain}, {"params": projected, "rank": 8, "update_proj_gap": 2, "projector": "randomized",
                             "residual_ratio": 0.02, "residual_warmup": 1}],
        lr=1e-2, weight_decay=0.1, optim_bits=bits,
    )
    return model, opt


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 24, generator=generator) for _ in range(count)]


def train(model, opt, inputs, scheduler=None) -> None:
    for x in inputs:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("bits", [32, 8])
def test_one_per_layer_step_equals_the_normal_step(bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    normal, normal_opt = make(bits)
    layered, layered_opt = make(bits)
    enable_per_layer_steps(layered_opt)
    x = batches(1)[0]
    normal(x).square().mean().backward()
    normal_opt.step()
    layered(x).square().mean().backward()
    for param in layered.parameters():
        assert isinstance(param.grad, ConsumedGradient)
    layered_opt.step()
    for a, b in zip(normal.parameters(), layered.parameters()):
        assert torch.equal(a, b)
        assert b.grad is None


def test_training_with_an_lr_scheduler_equals_normal_training():
    results = []
    for per_layer in (False, True):
        model, opt = make()
        if per_layer:
            enable_per_layer_steps(opt)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        train(model, opt, batches(5), scheduler)
        results.append([p.detach().clone() for p in model.parameters()])
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 6)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_full_gradients_never_coexist():
    model, opt = make()
    largest_live = []

    def record(_param):
        live = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p.grad, ConsumedGradient)]
        largest_live.append(sum(g.nbytes for g in live))

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(record)
    enable_per_layer_steps(opt)
    model(batches(1)[0]).sum().backward()
    assert max(largest_live) == max(p.nbytes for p in model.parameters())
    assert len(largest_live) == len(list(model.parameters()))


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_round_trip_resumes_exactly(bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    inputs = batches(6)
    model, opt = make(bits)
    enable_per_layer_steps(opt)
    train(model, opt, inputs[:3])
    saved = weights_only_round_trip(model, opt)
    train(model, opt, inputs[3:])
    again, again_opt = resumed(lambda: make(bits), saved)
    enable_per_layer_steps(again_opt)
    train(again, again_opt, inputs[3:])
    for name, param in again.named_parameters():  # a no-op optimizer would leave the checkpoint's values
        assert (param.detach() - saved["model"][name]).abs().mean() > 1e-2 * 0.25 / 50, name  # lr * default scale / 50
    assert_same_parameters(model, again)


def test_global_gradient_clipping_raises():
    model, opt = make()
    enable_per_layer_steps(opt)
    model(batches(1)[0]).sum().backward()
    with pytest.raises(RuntimeError, match="gradient-norm clipping"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_gradient_accumulation_raises():
    model, opt = make()
    enable_per_layer_steps(opt)
    x, y = batches(2)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        model(y).sum().backward()


def test_zero_grad_clears_the_markers_and_a_closure_raises():
    model, opt = make()
    enable_per_layer_steps(opt)
    model(batches(1)[0]).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: model(batches(1)[0]).sum())


def test_remove_returns_to_normal_steps():
    normal, normal_opt = make()
    layered, layered_opt = make()
    enable_per_layer_steps(layered_opt).remove()
    x = batches(1)[0]
    for model, opt in ((normal, normal_opt), (layered, layered_opt)):
        model(x).sum().backward()
        opt.step()
    for a, b in zip(normal.parameters(), layered.parameters()):
        assert torch.equal(a, b)
        assert b.grad is not None and not isinstance(b.grad, ConsumedGradient)


def test_bad_use_is_rejected():
    _, opt = make()
    enable_per_layer_steps(opt)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_per_layer_steps(opt)
    with pytest.raises(TypeError, match="GaLorePlusAdamW"):
        enable_per_layer_steps(torch.optim.AdamW([nn.Parameter(torch.zeros(2))]))


def test_distributed_job_without_the_ddp_model_is_rejected(monkeypatch):
    _, opt = make()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args, **kwargs: 2)
    with pytest.raises(RuntimeError, match="ddp_model=ddp"):
        enable_per_layer_steps(opt)


def test_ddp_model_must_be_a_distributed_data_parallel():
    model, opt = make()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        enable_per_layer_steps(opt, ddp_model=model)


def test_sharded_parameters_are_rejected(monkeypatch):
    _, opt = make()
    monkeypatch.setattr("galore_plus.per_layer.is_sharded", lambda param: True)
    with pytest.raises(RuntimeError, match="DTensor"):
        enable_per_layer_steps(opt)
