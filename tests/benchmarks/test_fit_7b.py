"""Smoke test of benchmarks/fit_7b.py on a tiny LLaMA config: same code path as the 7B run, in seconds."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tqdm")
pytest.importorskip("bitsandbytes")

from benchmarks import fit_7b  # noqa: E402
from galore_plus.memory import LIMITER_NORM_BYTES  # noqa: E402
from transformers import AutoConfig  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
PROJECTED_PER_LAYER = 7


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def run(tiny_config, tmp_path, *extra):
    return fit_7b.main(["--config", tiny_config, "--rank", "8", "--steps", "3", "--tokens", "8", "16", "--quiet",
                        "--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("method", sorted(fit_7b.METHODS))
def test_every_row_of_the_estimators_table_steps_with_the_state_it_estimates(tiny_config, tmp_path, method):
    """fit_7b's methods are the rows of galore_plus.memory.METHODS; each one's groups step (APOLLO's take no residual
    key), and its allocated optimizer state equals the estimate once the residual is chosen (after step 1)."""
    record = fit_7b.main(["--config", tiny_config, "--rank", "8", "--steps", "2", "--tokens", "8", "--quiet",
                          "--method", method, "--skip-refresh-comparison", "--out", str(tmp_path / "out")])
    assert record["steps"][-1]["state_bytes"] == record["estimate"]["optimizer_state"]


def test_tiny_run_measures_what_the_estimator_predicts(tiny_config, tmp_path):
    record = run(tiny_config, tmp_path)
    steps, estimate = record["steps"], record["estimate"]
    assert [step["tokens"] for step in steps] == [8, 8, 8, 16]
    projected = PROJECTED_PER_LAYER * TINY["num_hidden_layers"]
    assert [step["refreshes"] for step in steps] == [projected, 0, 0, 0]
    assert steps[0]["refresh_s"] > 0 and all(step["refresh_s"] == 0 for step in steps[1:])
    assert steps[2]["loss"] < steps[0]["loss"] - 0.05  # the same batch three times: training moved the weights
    for step in steps:
        assert step["param_bytes"] == estimate["parameters"]
        assert step["grad_bytes"] == estimate["gradients"]  # per-layer: the largest single gradient
        assert step["state_bytes"] == estimate["optimizer_state"]  # residual chosen at the end of step 1
        assert min(step["forward_backward_s"], step["optimizer_s"]) > 0
        assert 0 < step["projected_optimizer_s"] < step["optimizer_s"]  # norms, embedding and head are plain
        assert step["forward_backward_s"] + step["optimizer_s"] + step["refresh_s"] == pytest.approx(step["wall_s"])
        assert step["peak_resident_bytes"] > step["param_bytes"]
        assert 0 <= step["largest_growth_bytes"] <= step["peak_growth_in_optimizer"]
        assert step["resident_at_start"] + step["peak_growth_in_optimizer"] <= step["peak_resident_bytes"]
    assert record["projection_products_s"] > 0
    assert record["projection_products"] == "R and U, 4 m n r flops per weight"
    layer = record["layer_refresh"]
    assert layer["weights"] == layer["svd_refreshes"] == layer["galore_plus_refreshes"] == PROJECTED_PER_LAYER
    saved = json.loads((tmp_path / "out" / "tiny_galore+8.json").read_text())
    assert saved["steps"] == steps and saved["complete"]
    page = (tmp_path / "out" / "tiny_galore+8.md").read_text()
    assert "projected weights alone / products: step 1" in page
    assert "svd (scaled) / GaLore+ (measured in step 1)" in page and "| 4 | 16 |" in page and "Incomplete" not in page


def test_without_per_layer_all_gradients_are_alive(tiny_config, tmp_path):
    threads = torch.get_num_threads()
    try:
        record = run(tiny_config, tmp_path, "--method", "adamw32", "--no-per-layer", "--steps", "1", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert record["threads"] == 1  # --threads is applied before anything runs and recorded
    step = record["steps"][0]
    assert step["grad_bytes"] == record["estimate"]["gradients"] == step["param_bytes"]
    assert step["state_bytes"] == record["estimate"]["optimizer_state"]
    assert step["optimizer_s"] > 0 and "projection_products_s" not in record
    assert step["projected_optimizer_s"] is None  # no per-layer hooks: the step is not split


def test_refused_before_building(tiny_config, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a refused method must not build the model")

    monkeypatch.setattr(fit_7b, "build_model", no_build)
    with pytest.raises(SystemExit, match=r"refused before building anything: adamw32 .* estimated at 0\.00 GiB"):
        run(tiny_config, tmp_path, "--method", "adamw32", "--no-per-layer", "--budget-gib", "1e-4")
    assert not (tmp_path / "out").exists()


def test_built_model_is_bfloat16_and_computes_like_a_normally_built_one():
    from transformers import AutoModelForCausalLM

    config = tiny_transformers_config()
    model = fit_7b.build_model(config, seed=0)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    assert all(bool((p == 1).all()) for name, p in params.items() if name.endswith("norm.weight"))
    embed = params["model.embed_tokens.weight"].detach().float()
    assert abs(float(embed.mean())) < 0.002 and float(embed.std()) == pytest.approx(config.initializer_range, rel=0.05)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, reference(input_ids=tokens).logits, rtol=0, atol=0)


def tiny_transformers_config():
    fields = dict(TINY)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def test_product_timing_runs_the_two_products_of_a_step():
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountProducts(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "mm":
                CountProducts.calls += 1
            return func(*args, **(kwargs or {}))

    for basis_shape in ((8, 32), (64, 8)):  # right side Q (r, n), left side P (m, r)
        CountProducts.calls = 0
        with CountProducts():
            fit_7b.projection_product_seconds(Counter({((64, 32), basis_shape): 5}), repeats=1)
        assert CountProducts.calls == 2


def test_full_rank_residual_can_be_switched_off(tiny_config, tmp_path):
    """--full-rank-residual off reaches the optimizer: its state lacks the limiter's norm of every projected weight."""
    off = run(tiny_config, tmp_path / "off", "--steps", "1", "--full-rank-residual", "off", "--skip-refresh-comparison")
    on = run(tiny_config, tmp_path / "on", "--steps", "1", "--skip-refresh-comparison")
    projected = PROJECTED_PER_LAYER * TINY["num_hidden_layers"]
    assert on["steps"][0]["state_bytes"] - off["steps"][0]["state_bytes"] == LIMITER_NORM_BYTES * projected
    assert off["projection_products"] == on["projection_products"] == "R and U, 4 m n r flops per weight"


def test_accumulation_and_clipping_measure_what_the_estimator_predicts(tiny_config, tmp_path):
    record = run(tiny_config, tmp_path, "--micro-batches", "2", "--max-grad-norm", "1.0", "--skip-refresh-comparison")
    estimate = record["estimate"]
    assert record["accumulation_steps"] == 2 and estimate["accumulators"] > 0
    steps = record["steps"]
    assert all(step["micro_batches"] == 2 and step["grad_norm"] > 0 for step in steps)
    assert steps[2]["loss"] < steps[0]["loss"] - 0.05
    for step in steps[1:]:  # from step 2 on the residual's values at I are accumulated too
        assert step["accumulator_bytes"] == estimate["accumulators"]
        assert step["grad_bytes"] == estimate["gradients"]  # plain gradients kept, one projected one at a time
        assert step["state_bytes"] == estimate["optimizer_state"]  # with Fira's per-channel factor
    page = (tmp_path / "out" / "tiny_galore+8_accumulate2_clip1.md").read_text()
    assert "2 micro-batches per step, clipping at 1" in page
