"""The memory estimator equals what the optimizer and autograd actually allocate, for every combination."""

import json

import pytest
import torch
from torch import nn

from galore_plus import APOLLO, APOLLO_MINI, GaLorePlusAdamW, make_param_groups
from galore_plus.memory import GIB, build_meta_model, estimate_memory, load_config, main, memory_table, method_groups
from galore_plus.per_layer import ConsumedGradient, enable_per_layer_steps
from galore_plus.sparse_residual.index import residual_count

TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
TINY_GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=128)


def state_nbytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


class ParamBag(nn.Module):
    """Parameters of many shapes and dtypes; the loss is linear in them, so gradients are fixed tensors."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)

        def param(*shape, dtype=torch.float32):
            return nn.Parameter(torch.randn(*shape, generator=generator).to(dtype))

        self.query = param(32, 64)
        self.wide = param(2, 33000)
        self.tall_bf16 = param(48, 40, dtype=torch.bfloat16)
        self.embed = param(100, 64)
        self.plain_bf16 = param(64, 80, dtype=torch.bfloat16)
        self.bias = param(64)
        self.small_bf16 = param(10, dtype=torch.bfloat16)
        self.experts_bf16 = param(3, 24, 40, dtype=torch.bfloat16)  # a stack: 8-bit blocks straddle experts
        self.kernel = param(8, 4, 3, 3)
        self.directions = [torch.randn(p.shape, generator=generator) for p in self.parameters()]

    def loss(self, step: int) -> torch.Tensor:
        return sum(((p.float() * d) * (1 + step)).sum() for p, d in zip(self.parameters(), self.directions))

    def groups(self, residual_ratio: float) -> list[dict]:
        residual = dict(residual_ratio=residual_ratio, residual_warmup=1)
        return [
            {"params": [self.query], "rank": 8, "projector": "cross_head", "num_heads": 4, **residual},
            {"params": [self.wide], "rank": 1, **residual},
            {"params": [self.tall_bf16], "rank": 8, "proj_type": "reverse_std", **residual},
            {"params": [self.experts_bf16, self.kernel], "rank": 5, "full_rank_residual": True},
            {"params": [self.embed, self.plain_bf16, self.bias, self.small_bf16]},
        ]


def measured_training(model, groups, bits: int, per_layer: bool, steps: int = 3) -> tuple[int, int]:
    """(largest gradient bytes alive at once, optimizer state bytes) over a few real steps."""
    params = list(model.parameters())
    peak = [0]

    def record(_param):
        live = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, ConsumedGradient)]
        peak[0] = max(peak[0], sum(g.nbytes for g in live))

    for param in params:
        param.register_post_accumulate_grad_hook(record)
    opt = GaLorePlusAdamW(groups, lr=1e-3, optim_bits=bits)
    if per_layer:
        enable_per_layer_steps(opt)
    for step in range(steps):
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()
    return peak[0], state_nbytes(opt)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("residual_ratio", [0.0, 0.02])
@pytest.mark.parametrize("bits", [32, 8])
def test_estimate_equals_allocation(bits, residual_ratio, per_layer):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    model = ParamBag()
    groups = model.groups(residual_ratio)
    estimate = estimate_memory(groups, bits, per_layer)
    gradients, state = measured_training(model, groups, bits, per_layer)
    assert estimate.parameters == sum(p.nbytes for p in model.parameters())
    assert estimate.gradients == gradients
    assert estimate.optimizer_state == state
    assert estimate.total == estimate.parameters + estimate.gradients + estimate.optimizer_state


@pytest.mark.parametrize("residual_ratio", [0.0, 0.02])
@pytest.mark.parametrize("bits", [32, 8])
def test_estimate_with_per_layer_accumulation_equals_allocation(bits, residual_ratio):
    """Plain gradients kept until the boundary, one projected gradient at a time, the accumulators (measured just
    before the boundary) and the state with Fira's per-channel factor (cross_head and randomized have Fira on)."""
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    model = ParamBag()
    groups = model.groups(residual_ratio)
    groups[3]["params"] = [model.kernel]  # per-layer accumulation refuses expert stacks: the stack stays plain
    groups[-1]["params"].append(model.experts_bf16)
    params = list(model.parameters())
    peak = [0]

    def record(_param):
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    for param in params:
        param.register_post_accumulate_grad_hook(record)
    opt = GaLorePlusAdamW(groups, lr=1e-3, optim_bits=bits)
    handle = enable_per_layer_steps(opt, accumulation_steps=2)
    accumulated = []
    for step in range(3):
        for micro_batch in range(2):
            model.loss(2 * step + micro_batch).backward()
        accumulated.append(handle.accumulator_bytes())
        opt.step()
        opt.zero_grad()
    estimate = estimate_memory(groups, bits, per_layer=True, accumulation=True)
    assert estimate.gradients == peak[0]
    assert estimate.accumulators == accumulated[-1] > 0  # after the residual warmup: values at I too
    assert estimate.optimizer_state == state_nbytes(opt)
    assert estimate.total == estimate.parameters + estimate.gradients + estimate.optimizer_state + estimate.accumulators
    assert estimate_memory(groups, bits, per_layer=False, accumulation=True).accumulators == 0


def test_residual_and_8bit_change_the_state_as_documented():
    model = ParamBag()
    with_residual = estimate_memory(model.groups(0.02), 32).optimizer_state
    without = estimate_memory(model.groups(0.0), 32).optimizer_state
    count = sum(residual_count(0.02, tuple(p.shape)) for p in (model.query, model.wide, model.tall_bf16))
    assert with_residual > without + 8 * count
    assert estimate_memory(model.groups(0.0), 8).optimizer_state < without


TINY_MIXTRAL = dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_local_experts=4,
                    num_experts_per_tok=2)
WITH_RESIDUAL = dict(rank=8, residual_ratio=0.02, residual_warmup=1)
# case -> (config fields, make_param_groups options, the most dimensions of a projected weight). GPT-2's fused c_attn
# is a ``transposed`` group (its state is that of the (out, in) transpose); Mixtral's fused expert stacks (E, m, n)
# count E matrices' state.
ESTIMATE_CASES = {
    "llama": (TINY_LLAMA, WITH_RESIDUAL, 2),
    "gpt2": (TINY_GPT2, WITH_RESIDUAL, 2),
    "mixtral": (TINY_MIXTRAL, dict(rank=8), 3),
    "mixtral-4-bit-bases": (TINY_MIXTRAL, dict(rank=8, basis_bits=4), 3),
}


@pytest.mark.parametrize("case", ESTIMATE_CASES)
@pytest.mark.parametrize("bits", [32, 8])
def test_meta_model_estimate_equals_a_real_model_training(bits, case):
    """The estimate of a meta-device model equals that of the real model and the state allocated by its training."""
    fields, options, dims = ESTIMATE_CASES[case]
    if bits == 8 or "basis_bits" in options:
        pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    meta = build_meta_model(config, torch.float32)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config)
    estimate = estimate_memory(make_param_groups(meta, **options), bits)
    groups = make_param_groups(real, **options)
    assert estimate == estimate_memory(groups, bits)
    assert max(p.dim() for group in groups if "rank" in group for p in group["params"]) == dims
    opt = GaLorePlusAdamW(groups, lr=1e-3, optim_bits=bits)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        real(tokens, labels=tokens).loss.backward()
        opt.step()
    assert estimate.optimizer_state == state_nbytes(opt)


@pytest.mark.parametrize("name, count", [("mixtral-8x7b", 46_702_792_704), ("qwen3-30b-a3b", 30_532_122_624)])
def test_moe_tables_galore_plus_8bit_state_is_under_a_quarter_of_adamw_8bit(name, count):
    """Parameter counts of the public models (Mixtral-8x7B 46.7B, Qwen3-30B-A3B 30.5B)."""
    pytest.importorskip("bitsandbytes")
    model = build_meta_model(load_config(name, None), torch.bfloat16)
    rows = memory_table(model, [128])
    by_key = {(r["method"], r["bits"], r["per_layer"]): r["estimate"] for r in rows}
    assert by_key[("AdamW", 32, False)].parameters == 2 * count
    adamw_8bit = by_key[("AdamW 8-bit", 8, False)].optimizer_state
    assert adamw_8bit > count  # at least one byte per value for each of two moments of most tensors
    assert by_key[("GaLore+", 8, False)].optimizer_state <= adamw_8bit / 4


def test_llama2_7b_table():
    pytest.importorskip("bitsandbytes")
    model = build_meta_model(load_config("llama2-7b", None), torch.bfloat16)
    rows = memory_table(model, [128])
    by_key = {(r["method"], r["bits"], r["per_layer"]): r for r in rows}
    count = 6_738_415_616
    adamw = by_key[("AdamW", 32, False)]["estimate"]
    assert adamw.parameters == adamw.gradients == 2 * count
    assert adamw.optimizer_state == 2 * 2 * count + 4 * len(list(model.parameters()))
    assert by_key[("GaLore+", 8, True)]["fits"] and not by_key[("AdamW", 32, False)]["fits"]
    assert by_key[("GaLore+", 8, True)]["estimate"].total < 16 * GIB


PEER_GROUPS = {
    "svd (GaLore: no full-rank residual)": {"projector": "svd"},
    "random": {"projector": "random"},
    "apollo": {**APOLLO, "rank": 8},
    "apollo_mini": dict(APOLLO_MINI),
    "4-bit bases": {"projector": "randomized", "basis_bits": 4},
}


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("peer", sorted(PEER_GROUPS))
def test_estimate_equals_allocation_for_random_apollo_and_4_bit_bases(peer, bits):
    pytest.importorskip("bitsandbytes")
    model = ParamBag()
    options = {"rank": 8, **PEER_GROUPS[peer]}
    groups = [{"params": [model.query, model.tall_bf16], **options},
              {"params": [model.embed, model.plain_bf16, model.bias, model.small_bf16, model.wide]}]
    estimate = estimate_memory(groups, bits)
    assert estimate.optimizer_state == measured_training(model, groups, bits, per_layer=False)[1]


def test_random_projector_state_is_the_two_moments_only():
    """4096 x 4096 at rank 128: randomized keeps a 2 MiB basis and 4 MiB of moments; random only the moments."""
    with torch.device("meta"):
        weight = nn.Parameter(torch.empty(4096, 4096))
    randomized = estimate_memory([{"params": [weight], "rank": 128, "projector": "randomized"}]).optimizer_state
    random = estimate_memory([{"params": [weight], "rank": 128, "projector": "random"}]).optimizer_state
    assert random == 2 * 4 * 4096 * 128
    assert random <= 0.67 * randomized


def test_llama2_7b_apollo_mini_state_with_8_bit_plain_groups_is_under_half_a_gib():
    pytest.importorskip("bitsandbytes")
    model = build_meta_model(load_config("llama2-7b", None), torch.bfloat16)

    def state(method: str, bits: int) -> int:
        return estimate_memory(method_groups(model, method, 128, 0.012), bits).optimizer_state

    mini = state("APOLLO-Mini", 8)
    assert mini < 0.5 * GIB
    assert mini < state("APOLLO", 8) < state("GaLore+", 8)
    assert state("GaLore+ 4-bit bases", 32) < state("GaLore+", 32)


def test_command_line_prints_a_row_per_combination(tmp_path, capsys):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY_LLAMA))
    main(["--config", str(config_file), "--ranks", "8", "16", "--dtype", "float32"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 2 * 2 + 7 * 2 * 2 + 2 * 1 * 2  # AdamW x2; 7 projected rows at each rank; APOLLO-Mini at rank 1
    assert any(line.startswith("| GaLore+ | 8 | 16 | yes |") for line in rows)


def test_bad_config_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown --model"):
        load_config("llama-999b", None)
    with pytest.raises(ValueError, match="exactly one"):
        load_config("llama2-7b", "x.json")
    no_type = tmp_path / "no_type.json"
    no_type.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        load_config(None, str(no_type))


def test_command_line_accepts_a_checkpoint_folder_with_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    main(["--config", str(tmp_path), "--ranks", "8", "--dtype", "float32"])
    assert "| GaLore+ | 8 | 8 | yes |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--config", "no/such/file.json"], "no such file"),
    (["--model", "llama-999b"], "unknown --model"),
    (["--config", "{folder}"], "no such file"),
    (["--config", "{not_json}"], "not valid JSON"),
    (["--config", "{unknown_type}"], "unknown_model"),
])
def test_command_line_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, argv, words):
    (tmp_path / "not_json.json").write_text("{hidden_size: 8")
    (tmp_path / "unknown_type.json").write_text(json.dumps({"model_type": "unknown_model"}))
    paths = dict(folder=tmp_path, not_json=tmp_path / "not_json.json", unknown_type=tmp_path / "unknown_type.json")
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(**paths) for arg in argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m galore_plus.memory: error:") and words in lines[0]
    assert "Traceback" not in captured.err
