"""make_param_groups on transformers' LLaMA, GPT-2 and BERT built from tiny configs (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from galore_plus import GaLorePlusAdamW, make_param_groups
from galore_plus.groups import plan_param_groups

transformers = pytest.importorskip("transformers")

from support import tiny_llama  # noqa: E402


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config)


def group_of(plan, name: str) -> dict:
    return next(g for g in plan.groups if g["name"] == plan.placement[name])


def test_every_trainable_parameter_is_placed_exactly_once():
    for model in (tiny_llama(), tiny_gpt2(), tiny_bert()):
        groups = make_param_groups(model, rank=4)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_llama_query_and_key_get_cross_head_with_their_own_head_counts():
    plan = plan_param_groups(tiny_llama(), rank=4)
    q = group_of(plan, "model.layers.0.self_attn.q_proj.weight")
    k = group_of(plan, "model.layers.1.self_attn.k_proj.weight")
    assert (q["projector"], q["num_heads"]) == ("cross_head", 4)
    assert (k["projector"], k["num_heads"]) == ("cross_head", 2)
    for leaf in ("v_proj", "o_proj"):
        assert plan.placement[f"model.layers.0.self_attn.{leaf}.weight"] == "randomized"
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        assert plan.placement[f"model.layers.1.mlp.{leaf}.weight"] == "randomized"
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert plan.placement[name] == "adamw"
    assert plan.unplaced == {}


def test_gpt2_fused_c_attn_is_transposed_cross_head_and_other_conv1d_weights_are_projected():
    model = tiny_gpt2()
    plan = plan_param_groups(model, rank=4)
    c_attn = group_of(plan, "transformer.h.1.attn.c_attn.weight")
    assert (c_attn["projector"], c_attn["num_heads"], c_attn["transposed"]) == ("cross_head", 12, True)
    for leaf in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert plan.placement[f"transformer.h.0.{leaf}.weight"] == "randomized"
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.bias"):
        assert plan.placement[name] == "adamw"
    assert "lm_head.weight" not in plan.placement
    assert plan.unplaced == {}


def test_gpt2_tied_lm_head_is_listed_as_unplaced_when_included():
    plan = plan_param_groups(tiny_gpt2(), rank=4, include_lm_head=True)
    assert "tied to transformer.wte.weight" in plan.unplaced["lm_head.weight"]
    assert plan.placement["transformer.wte.weight"] == "adamw"


def test_bert_query_key_cross_head_value_randomized():
    model = tiny_bert()
    plan = plan_param_groups(model, rank=4)
    attention = "bert.encoder.layer.0.attention.self"
    assert group_of(plan, f"{attention}.query.weight")["projector"] == "cross_head"
    assert group_of(plan, f"{attention}.key.weight")["num_heads"] == 4
    assert plan.placement[f"{attention}.value.weight"] == "randomized"
    assert plan.placement["bert.encoder.layer.1.intermediate.dense.weight"] == "randomized"
    assert plan.placement["bert.embeddings.word_embeddings.weight"] == "adamw"
    assert "cls.predictions.decoder.weight" not in plan.placement
    assert plan.unplaced == {}


def test_bert_tied_decoder_is_named_in_a_warning_when_heads_are_included():
    with pytest.warns(UserWarning, match="cls.predictions.decoder.weight: tied to bert.embeddings.word_embeddings"):
        make_param_groups(tiny_bert(), rank=4, include_lm_head=True)


def test_distilbert_q_lin_k_lin_are_cross_head_and_its_tied_vocab_projector_is_an_output_head():
    config = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48,
                                           max_position_embeddings=16)
    plan = plan_param_groups(transformers.DistilBertForMaskedLM(config), rank=4)
    attention = "distilbert.transformer.layer.0.attention"
    assert plan.placement[f"{attention}.q_lin.weight"] == plan.placement[f"{attention}.k_lin.weight"] == "cross_head_4_heads"
    assert plan.placement[f"{attention}.v_lin.weight"] == "randomized"
    assert plan.unplaced == {}


def test_gpt_neox_fused_query_key_value_is_cross_head_over_3h_heads():
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=48, max_position_embeddings=16)
    plan = plan_param_groups(transformers.GPTNeoXForCausalLM(config), rank=4)
    group = group_of(plan, "gpt_neox.layers.0.attention.query_key_value.weight")
    assert (group["projector"], group["num_heads"], group.get("transposed", False)) == ("cross_head", 12, False)
    assert plan.placement["gpt_neox.layers.0.attention.dense.weight"] == "randomized"


def test_weights_smaller_than_rank_are_listed_with_the_reason():
    plan = plan_param_groups(tiny_llama(), rank=40)
    assert "rank=40 is not below the side of shape (32, 32) it would project (32)" in plan.unplaced["model.layers.0.self_attn.q_proj.weight"]
    assert plan.placement["model.layers.0.self_attn.q_proj.weight"] == "adamw"


def test_transposed_conv1d_weight_steps_like_the_equivalent_linear_weight():
    """A Conv1D weight W (in, out) with transposed=True follows the nn.Linear weight W^T (out, in)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    options = dict(rank=6, update_proj_gap=2, projector="cross_head", num_heads=3)
    conv_optimizer = GaLorePlusAdamW([{"params": [conv.weight], "transposed": True, **options},
                                      {"params": [conv.bias]}], lr=1e-2)
    linear_optimizer = GaLorePlusAdamW([{"params": [linear.weight], **options}, {"params": [linear.bias]}], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(32, 16, generator=generator), torch.randn(32, 24, generator=generator)
        for module, optimizer in ((conv, conv_optimizer), (linear, linear_optimizer)):
            nn.functional.mse_loss(module(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(conv.weight.t(), linear.weight)
    assert conv_optimizer.state[conv.weight]["projector"].shape == (6, 16)


def test_transposed_must_be_a_bool_and_heads_must_divide_the_outputs():
    weight = nn.Parameter(torch.zeros(16, 24))
    with pytest.raises(TypeError, match="key 'transposed'"):
        GaLorePlusAdamW([{"params": [weight], "rank": 2, "transposed": 1}])
    with pytest.raises(ValueError, match=r"key 'num_heads': 5 does not divide the 24 rows .*\(transposed\)"):
        GaLorePlusAdamW([{"params": [weight], "rank": 2, "transposed": True, "projector": "cross_head", "num_heads": 5}])


class FusedAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int):
        super().__init__()
        head_dim = width // heads
        self.qkv_proj = nn.Linear(width, (heads + 2 * kv_heads) * head_dim)
        self.o_proj = nn.Linear(width, width)


def test_fused_linear_qkv_is_cross_head_over_all_q_k_v_heads():
    plan = plan_param_groups(FusedAttention(32, 4, 2), rank=4, num_heads=4, num_kv_heads=2)
    group = group_of(plan, "qkv_proj.weight")
    assert (group["projector"], group["num_heads"]) == ("cross_head", 8)


def test_missing_head_count_names_the_argument_to_pass():
    with pytest.raises(ValueError, match=r"num_heads=H"):
        make_param_groups(FusedAttention(32, 4, 4), rank=4)


def test_residual_ratio_is_set_only_on_cross_head_groups():
    plan = plan_param_groups(tiny_llama(), rank=4, residual_ratio=0.1)
    assert group_of(plan, "model.layers.0.self_attn.q_proj.weight")["residual_ratio"] == 0.1
    assert "residual_ratio" not in group_of(plan, "model.layers.0.self_attn.v_proj.weight")


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
def test_groups_train_one_step_with_finite_weights(build):
    model = build()
    optimizer = GaLorePlusAdamW(make_param_groups(model, rank=4, update_proj_gap=2), lr=1e-3)
    ids = torch.arange(12).reshape(2, 6) % 64
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- no silent fallback


def test_residual_without_cross_head_goes_to_query_and_key_in_their_own_group():
    plan = plan_param_groups(tiny_llama(), rank=4, cross_head=False, residual_ratio=0.012)
    for name in ("q_proj", "k_proj"):
        group = group_of(plan, f"model.layers.1.self_attn.{name}.weight")
        assert (group["name"], group["projector"], group["residual_ratio"]) == ("randomized_residual", "randomized", 0.012)
    assert "residual_ratio" not in group_of(plan, "model.layers.1.self_attn.v_proj.weight")


def test_residual_ratio_without_any_query_or_key_weight_warns():
    with pytest.warns(UserWarning, match="residual_ratio=0.012 applies to query/key projections .* no residual is used"):
        make_param_groups(tiny_llama(), rank=4, target_modules=["v_proj", "o_proj"], residual_ratio=0.012)


@pytest.mark.parametrize("target_modules, words", [
    (["q_proj", "v_prj"], "entry 'v_prj' (did you mean 'v_proj'?) matches no nn.Linear or Conv1D module"),
    (["nothing"], "entry 'nothing' matches no nn.Linear or Conv1D module"),
    ("nothing", "entry 'nothing' matches no"),
    (["embed_tokens"], "entry 'embed_tokens' matches no nn.Linear"),
])
def test_target_modules_entry_matching_no_linear_layer_raises(target_modules, words):
    with pytest.raises(ValueError) as info:
        make_param_groups(tiny_llama(), rank=4, target_modules=target_modules)
    assert words in str(info.value) and "q_proj" in str(info.value)


def test_head_count_that_does_not_divide_the_outputs_raises_naming_the_weight():
    with pytest.raises(ValueError, match=r"3 heads \(from num_heads/num_kv_heads you passed\) do not divide the 32 "
                                         r"outputs of model.layers.0.self_attn.q_proj.weight"):
        make_param_groups(tiny_llama(), rank=4, num_heads=3, num_kv_heads=2)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"rank": "16"}, TypeError, "make_param_groups: rank must be an int, got '16'"),
    ({"rank": 0}, ValueError, "rank must be >= 1"),
    ({"update_proj_gap": 2.5}, TypeError, "update_proj_gap must be an int"),
    ({"residual_ratio": "0.01"}, TypeError, "residual_ratio must be a number"),
    ({"residual_ratio": 1.5}, ValueError, "residual_ratio must be in [0, 1)"),
    ({"num_heads": 0}, ValueError, "num_heads must be None or an int >= 1"),
    ({"lr": "1e-3"}, TypeError, "make_param_groups(...), key 'lr': must be a number"),
    ({"weight_decay": -1.0}, ValueError, "key 'weight_decay': must be a finite number >= 0"),
    ({"update_proj_gaps": 10}, TypeError, "unexpected keyword argument 'update_proj_gaps' (did you mean 'update_proj_gap'?)"),
    ({"projector": "cross_head"}, ValueError, "through cross_head=True"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, words):
    with pytest.raises(error) as info:
        make_param_groups(tiny_llama(), **{"rank": 4, **kwargs})
    assert words in str(info.value)


def test_lr_and_weight_decay_reach_every_group_and_no_decay_names_get_zero():
    model = tiny_llama()
    no_decay = [name for name, _ in model.named_parameters() if "norm" in name or name.endswith("o_proj.weight")]
    groups = make_param_groups(model, rank=4, lr=0.02, weight_decay=0.1, no_decay=no_decay)
    assert all(group["lr"] == 0.02 for group in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for param in group["params"]:
            assert group["weight_decay"] == (0.0 if names[id(param)] in no_decay else 0.1), names[id(param)]
    by_name = {group["name"]: group for group in groups}
    assert by_name["randomized_no_decay"]["rank"] == 4 and by_name["adamw"]["weight_decay"] == 0.1
    optimizer = GaLorePlusAdamW(groups)
    assert {group["lr"] for group in optimizer.param_groups} == {0.02}
    with pytest.raises(ValueError, match="no_decay names parameters the model does not have"):
        make_param_groups(model, rank=4, no_decay=["model.norm.weigth"])


def test_unplaced_weights_warning_names_the_memory_they_keep():
    with pytest.warns(UserWarning, match=r"14 weight\(s\) of two or more dimensions are not projected and stay in the "
                                         r"plain AdamW group with full-size moments \(\d+\.\d KiB\)"):
        make_param_groups(tiny_llama(), rank=32)


@pytest.mark.parametrize("target_modules", [r".*\.(q_proj|v_proj)", ["q_proj", "mlp.up_proj"], "self_attn.q_proj"])
def test_target_modules_select_the_same_layers_as_add_adapters(target_modules):
    from galore_plus.adapters import add_adapters

    model = tiny_llama()
    if target_modules == "self_attn.q_proj":
        # a regex must match the whole module name, in both (as in peft): a substring selects nothing
        with pytest.raises(ValueError, match="matches no"):
            make_param_groups(model, rank=4, target_modules=target_modules)
        with pytest.raises(ValueError):
            add_adapters(model, "lora", rank=2, target_modules=target_modules)
        return
    plan = plan_param_groups(model, rank=4, target_modules=target_modules)
    projected = {name.removesuffix(".weight") for name, group in plan.placement.items() if "rank" in
                 next(g for g in plan.groups if g["name"] == group)}
    adapted = set(add_adapters(model, "lora", rank=2, target_modules=target_modules))
    assert projected == adapted and len(adapted) == 4


def test_group_options_go_only_to_the_groups_whose_projector_reads_them():
    """head_projector is read by cross_head only, oversample by cross_head and randomized, proj_type not by
    cross_head: each projected group gets the options its projector reads, and the optimizer accepts them all."""
    model = tiny_llama()
    plan = plan_param_groups(model, rank=4, head_projector="randomized", oversample=4, proj_type="reverse_std")
    query, value = (group_of(plan, f"model.layers.0.self_attn.{name}.weight") for name in ("q_proj", "v_proj"))
    assert query["head_projector"] == "randomized" and query["oversample"] == 4 and "proj_type" not in query
    assert "head_projector" not in value and value["oversample"] == 4 and value["proj_type"] == "reverse_std"
    GaLorePlusAdamW(plan.groups)


def test_a_group_option_no_projected_group_reads_raises_naming_who_reads_it():
    with pytest.raises(ValueError, match="cross_head_heads=2 is read by projector 'cross_head', and no projected group"):
        make_param_groups(tiny_llama(), rank=4, cross_head=False, cross_head_heads=2)
    with pytest.raises(ValueError, match="scale_type='tensor' is read by update rule 'apollo'"):
        make_param_groups(tiny_llama(), rank=4, scale_type="tensor")


def test_presets_make_accepted_groups():
    from galore_plus import APOLLO, APOLLO_MINI
    for preset in (APOLLO, APOLLO_MINI):
        options = {"rank": 4, **preset}
        GaLorePlusAdamW(make_param_groups(tiny_llama(), cross_head=False, **options))


def test_all_linear_means_one_thing_for_parameter_groups_and_adapters():
    """Every layer but an output head, in make_param_groups and in add_adapters alike."""
    from galore_plus.adapters.targets import name_matchers
    from galore_plus.groups import module_matches

    adapters = name_matchers("all-linear")["all-linear"]
    names = ["model.layers.0.self_attn.q_proj", "lm_head", "model.score", "classifier", "cls.predictions.decoder",
             "model.layers.0.mlp.down_proj", "output"]
    assert [module_matches(name, "all-linear") for name in names] == [adapters(name) for name in names]
    assert [adapters(name) for name in names] == [True, False, False, False, False, True, False]
