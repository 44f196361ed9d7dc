"""make_param_groups and GaLorePlusAdamW on transformers 5's mixture-of-experts models, from tiny configs (no download).

transformers 5 stores each layer's experts fused, as 3-D parameters (E, m, n) of an ``...Experts`` module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from galore_plus import GaLorePlusAdamW, make_param_groups
from galore_plus.groups import plan_param_groups
from support import assert_same_parameters, resumed, weights_only_round_trip

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8)
MODELS = {
    "Mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "Qwen2Moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=16, shared_expert_intermediate_size=24)),
    "Qwen3Moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=16)),
    "Olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "DeepseekV3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)),
    "GptOss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}
ROUTERS = ("mlp.gate.weight", "mlp.router.weight", "shared_expert_gate.weight")


def tiny(name: str) -> nn.Module:
    config_class, model_class, extra = MODELS[name]
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**COMMON, **extra))


def hidden_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight but embeddings, output head, norms, biases and routers."""
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in name
            and not name.startswith("lm_head") and "bias" not in name and not name.endswith(ROUTERS)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_experts_and_attention_are_projected_routers_and_embeddings_stay_plain(name):
    model = tiny(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left in AdamW that would need a warning
        plan = plan_param_groups(model, rank=8)
        groups = make_param_groups(model, rank=8)
    projected = {param_name for param_name, group in plan.placement.items() if group != "adamw"}
    hidden = hidden_weights(model)
    share = sum(hidden[n].numel() for n in projected & set(hidden)) / sum(p.numel() for p in hidden.values())
    assert share >= 0.95
    stacks = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert stacks and all(plan.placement[n] == "randomized_experts" for n in stacks)
    for param_name, param in model.named_parameters():
        if "embed_tokens" in param_name or param_name.endswith(ROUTERS) or param.dim() == 1:
            assert plan.placement[param_name] == "adamw", param_name
    GaLorePlusAdamW(groups)  # every group is valid


def test_verbose_shows_the_expert_group(capsys):
    make_param_groups(tiny("Mixtral"), rank=8, verbose=True)
    shown = capsys.readouterr().out
    assert "randomized_experts:    4 tensors (model.layers.0.mlp.experts.gate_up_proj" in shown
    assert "model.layers.0.mlp.gate.weight" in shown.split("adamw:")[1]


def test_unknown_tensors_left_in_adamw_are_named_with_their_bytes():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.conv1d = nn.Conv1d(4, 8, 3)
            self.table = nn.Parameter(torch.zeros(2, 16, 16))

    # bytes of the two moments: 2 x 4 x (2 x 16 x 16 + 8 x 4 x 3) = 4864 = 4.75 KiB
    with pytest.warns(UserWarning, match=r"2 weight\(s\) of two or more dimensions are not projected .*\(4\.8 KiB\): "
                                         r"table: a 3-D tensor of Odd that make_param_groups does not know how to "
                                         r"project; conv1d.weight: a 3-D Conv1d kernel"):
        make_param_groups(Odd(), rank=2)


def test_conv2d_kernels_are_projected_as_matrices():
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    plan = plan_param_groups(model, rank=4)
    assert plan.placement == {"0.weight": "randomized", "0.bias": "adamw", "2.weight": "randomized", "2.bias": "adamw"}
    opt = GaLorePlusAdamW(plan.groups, lr=1e-2)
    model(torch.randn(2, 4, 8, 8)).square().mean().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    assert opt.state[model[0].weight]["exp_avg"].shape == (4, 36)  # (out, in kh kw) = (16, 36): left side, rank 4


def train(model: nn.Module, opt: GaLorePlusAdamW, batches: list[torch.Tensor]) -> None:
    for tokens in batches:
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_resume_of_a_tiny_mixtral_is_bit_exact(optim_bits):
    if optim_bits == 8:
        pytest.importorskip("bitsandbytes")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 12), generator=generator) for _ in range(6)]

    def fresh():
        model = tiny("Mixtral")
        groups = make_param_groups(model, rank=8, update_proj_gap=2, full_rank_residual=True)
        return model, GaLorePlusAdamW(groups, lr=1e-3, optim_bits=optim_bits)

    model, opt = fresh()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, opt, batches[:3])
    saved = weights_only_round_trip(model, opt)
    train(model, opt, batches[3:])
    again, again_opt = resumed(fresh, saved)
    train(again, again_opt, batches[3:])
    assert_same_parameters(model, again)
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(start[stack], dict(model.named_parameters())[stack])


def test_per_layer_steps_of_a_tiny_mixtral_equal_ordinary_steps():
    from galore_plus.per_layer import enable_per_layer_steps

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 12), generator=generator) for _ in range(3)]
    models = []
    for per_layer in (False, True):
        model = tiny("Mixtral")
        opt = GaLorePlusAdamW(make_param_groups(model, rank=8, update_proj_gap=2), lr=1e-3)
        if per_layer:
            enable_per_layer_steps(opt)
        train(model, opt, batches)
        models.append(dict(model.named_parameters()))
    normal, layered = models
    for name, param in normal.items():
        assert torch.equal(param, layered[name]), name
    assert not torch.equal(normal["model.layers.1.mlp.experts.down_proj"], tiny("Mixtral").model.layers[1].mlp.experts.down_proj)
