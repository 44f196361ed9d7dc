"""Smoke test of benchmarks/step_temporaries.py on a tiny LLaMA config."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from benchmarks.step_temporaries import main  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def test_every_weight_shape_is_stepped_once_per_group(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    rows = main(["--config", str(path), "--rank", "8"])
    # q (64x64) and k (32x64) cross_head with residual; v (32x64), o (64x64), gate/up (160x64), down (64x160)
    # randomized; embedding and lm_head (256x64) and norms (64) plain
    found = {(tuple(row["shape"]), row["projector"]): row["count"] for row in rows}
    assert found == {((64, 64), "cross_head"): 2, ((32, 64), "cross_head"): 2, ((32, 64), "randomized"): 2,
                     ((64, 64), "randomized"): 2, ((160, 64), "randomized"): 4, ((64, 160), "randomized"): 2,
                     ((256, 64), "plain AdamW"): 2, ((64,), "plain AdamW"): 5}
    for row in rows:
        assert row["first"]["grad_bytes"] == 2 * math.prod(row["shape"])  # bfloat16
        assert row["second"]["state_bytes"] > 0 and min(row["first"]["peak_growth"], row["second"]["peak_growth"]) >= 0
