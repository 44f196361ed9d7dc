"""The levers inside GaLorePlusAdamW: group-key validation, each lever against a reference, composition, resume."""

import pytest
import torch

from galore_plus import GaLorePlusAdamW


def param(*shape):
    return torch.nn.Parameter(torch.zeros(*shape))


@pytest.mark.parametrize(
    "group, error, words",
    [
        ({"moment_transfer": 1}, TypeError, "'moment_transfer': must be a bool"),
        ({"full_rank_residual": "yes"}, TypeError, "'full_rank_residual': must be a bool"),
        ({"adaptive_gap": None}, TypeError, "'adaptive_gap': must be a bool"),
        ({"norm_growth_limit": 0.99}, ValueError, "'norm_growth_limit': must be >= 1"),
        ({"norm_growth_limit": "1.01"}, TypeError, "'norm_growth_limit': must be a finite number"),
        ({"max_update_proj_gap": 5, "update_proj_gap": 10}, ValueError, "'max_update_proj_gap': must be >= 10"),
        ({"max_update_proj_gap": 20.0}, TypeError, "'max_update_proj_gap': must be an int"),
        ({"gap_overlap_threshold": 0.0}, ValueError, "'gap_overlap_threshold': must be in (0, 1]"),
        ({"gap_overlap_threshold": 1.5}, ValueError, "'gap_overlap_threshold': must be in (0, 1]"),
        ({"gap_patience": 0}, ValueError, "'gap_patience': must be >= 1"),
        ({"scale": "automatic"}, TypeError, "'scale': must be a finite number or 'auto'"),
        ({"cross_head_heads": 2.0}, TypeError, "'cross_head_heads': must be an int"),
        ({"projector": "cross_head", "num_heads": 4, "cross_head_heads": 0}, ValueError, "'cross_head_heads': must be >= 1"),
        ({"projector": "cross_head", "num_heads": 4, "cross_head_heads": 5}, ValueError, "'cross_head_heads': 5 heads"),
        ({"rank": 4, "projector": "cross_head", "num_heads": 4, "cross_head_heads": 1}, ValueError,
         "needs between rank = 4"),
    ],
)
def test_bad_lever_keys_raise_naming_the_group_and_key(group, error, words):
    with pytest.raises(error) as info:
        GaLorePlusAdamW([{"params": [param(3)]}, {"params": [param(8, 8)], "name": "attn", "rank": 2, **group}])
    assert "param group 1 ('attn')" in str(info.value)
    assert words in str(info.value)


def test_lever_keys_in_a_plain_group_are_refused():
    with pytest.raises(ValueError, match="param group 0, key 'moment_transfer': is only meaningful in a projected group"):
        GaLorePlusAdamW([{"params": [param(4, 4)], "moment_transfer": True}])
