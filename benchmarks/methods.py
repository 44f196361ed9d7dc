"""The methods the main job compares: one :class:`MethodSpec` per method in :data:`METHODS`.

A method is a name, a one-line description, a builder that makes its optimizer for a fresh model
(adding adapters first where the method trains adapters), the packages it needs, and the method
sets it belongs to. Nothing else in the benchmark knows about individual methods.

How to add a method (one entry in :data:`METHODS`, nothing else):

* a GaLorePlusAdamW variant: ``galore_plus_method("name", "what it is", sets=("levers",), my_key=True)``
  (extra keyword arguments become keys of every projected group; ``placement=`` overrides
  ``make_param_groups`` arguments; ``optim_bits=8`` goes to the constructor);
* an adapter method: ``adapter_method("name", "what it is", "kind")`` (``add_adapters(model, kind, ...)``);
* anything else: ``MethodSpec("name", "what it is", build=my_builder, requires=("package",))`` with
  ``my_builder(model, settings, seed) -> torch.optim.Optimizer``.

A method whose package is missing, or whose GaLorePlusAdamW group keys do not exist (yet), is
listed as unavailable with the reason (:func:`unavailable_reason`), never replaced. ``sets``:
``default`` methods run without ``--methods`` (the default command is kept at about 15 minutes on an
idle 2-core CPU, so new variants go to their own set, e.g. ``levers``, ``peers``, ``adapters``);
every method is in ``all``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from galore_plus import GaLorePlusAdamW, make_param_groups
from galore_plus import APOLLO, APOLLO_MINI
from galore_plus.group_options import CONSTRUCTOR_HYPERPARAMETERS, projected_group_defaults, unread_keys

from .peers import (APOLLO_MINI_SCALING, APOLLO_SCALING, apollo_torch_adamw, fira_adamw, galore_torch_adamw,
                    peer_groups)

HEADLINE_RESIDUAL = 0.012


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer settings of one run: the learning rate is chosen per method, the rest is shared."""

    lr: float
    weight_decay: float
    rank: int
    update_proj_gap: int
    scale: float
    lora_alpha: float | None
    steps: int  # the run's length in optimizer steps (AdaLoRA's budget schedule needs it)


Builder = Callable[[nn.Module, OptimSettings, int], torch.optim.Optimizer]
# (trained model, test-loss function) -> test loss of named variants of the trained model (DyLoRA: each rank)
Variants = Callable[[nn.Module, Callable[[nn.Module], float]], dict[str, float]]


@dataclass(frozen=True)
class MethodSpec:
    """One method: ``build(model, settings, seed)`` returns its optimizer (and may add adapters to ``model``);
    ``variants``, if given, measures after training the test loss of named variants of the trained model
    (DyLoRA at several ranks), written to results.md beside the table.

    ``requires``: importable modules it needs. ``probe``: tries the method on a tiny weight and returns why it
    cannot run here (listed as unavailable with that reason), or None. ``group_keys``: GaLorePlusAdamW group keys it sets
    (checked to exist). ``lr_grids``: regime -> its own learning-rate grid, used instead of the
    regime's shared default grid (never instead of an explicit ``--lr``/``--lr-grid``) where the
    shared grid does not bracket its best.
    """

    name: str
    description: str
    build: Builder
    variants: Variants | None = None
    requires: tuple[str, ...] = ()
    probe: Callable[[], str | None] | None = None
    sets: tuple[str, ...] = ("default",)
    group_keys: dict[str, Any] = field(default_factory=dict)
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)


# From scratch, the GaLore-type methods (update scale 0.25) need larger learning rates than AdamW: the
# pre-training regime's shared grid (3e-4 .. 1e-2) is shifted up by one decade for them (docs/benchmarks.md shows
# the validation loss at every lr tried).
PROJECTED_LR_GRIDS: dict[str, tuple[float, ...]] = {"pretrain": (3e-3, 1e-2, 3e-2)}
# Muon's update (match_rms_adamw) moves hidden matrices faster per lr than AdamW in pre-training.
MUON_LR_GRIDS: dict[str, tuple[float, ...]] = {"pretrain": (3e-3, 1e-2, 3e-2)}


# FRUGAL at scale 1 moves every entry outside the subspace by the lr itself (a sign), more than the projected methods'
# scale 0.25 updates: in the 100-step runs of docs/levers.md section 6 its validation loss was best at 3e-3, with 1e-3
# and 1e-2 both worse, so its grid is the projected one shifted down by half a decade.
FIELD_LR_GRIDS: dict[str, tuple[float, ...]] = {"pretrain": (1e-3, 3e-3, 1e-2)}


def galore_plus_method(name: str, description: str, *, sets: tuple[str, ...] = ("default",),
                       placement: dict[str, Any] | None = None, optim_bits: int = 32, **group_keys: Any) -> MethodSpec:
    """A GaLorePlusAdamW method: ``make_param_groups(model, **placement)`` plus ``group_keys`` in every projected group."""
    placement = dict(placement or {})

    def build(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
        shared = {"rank": settings.rank, "update_proj_gap": settings.update_proj_gap, "scale": settings.scale}
        groups = make_param_groups(model, **{**shared, **placement})
        for group in groups:
            if "rank" in group:
                group.update(group_keys)
                for key in set(unread_keys(group)) & set(group_keys):   # e.g. cross_head_heads in a randomized group
                    del group[key]
        return GaLorePlusAdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay, seed=seed,
                               optim_bits=optim_bits)

    requires = ("bitsandbytes",) if optim_bits == 8 else ()
    return MethodSpec(name, description, build, requires=requires, sets=sets, group_keys=dict(group_keys),
                      lr_grids=PROJECTED_LR_GRIDS)


def adapter_method(name: str, description: str, kind: str, *, sets: tuple[str, ...] = ("default",),
                   options: Callable[[OptimSettings], dict[str, Any]] | None = None, variants: Variants | None = None,
                   **adapter_kwargs: Any) -> MethodSpec:
    """An adapter method: ``add_adapters(model, kind, rank, alpha, target_modules="all-linear")``, AdamW on the adapters.

    ``options(settings)`` gives ``add_adapters`` options that depend on the run (AdaLoRA's schedule). The training
    loop adds ``adapter_loss(model)`` to the loss and calls ``adapter_step(model, step)`` after each optimizer step.
    """

    def build(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
        from galore_plus.adapters import adapter_parameters, add_adapters

        run_options = options(settings) if options is not None else {}
        add_adapters(model, kind, settings.rank, alpha=settings.lora_alpha, target_modules="all-linear", seed=seed,
                     **adapter_kwargs, **run_options)
        return torch.optim.AdamW(adapter_parameters(model), lr=settings.lr, weight_decay=settings.weight_decay)

    return MethodSpec(name, description, build, sets=sets, variants=variants)


def adalora_schedule(settings: OptimSettings) -> dict[str, Any]:
    """AdaLoRA's schedule in the main job: initial rank ``--rank``, target ``2/3`` of it (the paper's initial budget
    of 1.5x the target), budget fixed for the first 10 % of steps, pruned until 80 %, then fixed; peft's other defaults."""
    return {"target_rank": max(1, 2 * settings.rank // 3), "total_steps": settings.steps,
            "warmup_steps": settings.steps // 10, "final_steps": settings.steps // 5}


def dylora_ranks(model: nn.Module, test_loss: Callable[[nn.Module], float]) -> dict[str, float]:
    """Test loss of one trained DyLoRA model at ranks r/8, r/4, r/2 and r (those >= 1, without repeats)."""
    from galore_plus.adapters import DyLoRALinear, set_adapter_rank

    rank = max(layer.rank for layer in model.modules() if isinstance(layer, DyLoRALinear))
    losses = {}
    for b in sorted({max(1, rank // 8), max(1, rank // 4), max(1, rank // 2), rank}):
        set_adapter_rank(model, b)
        losses[f"rank {b}"] = test_loss(model)
    set_adapter_rank(model, rank)
    return losses


def _adamw(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


class OptimizerPair(torch.optim.Optimizer):
    """Two optimizers stepped as one, so the training loop and its learning-rate schedule see one optimizer: its
    ``param_groups`` are both optimizers' groups (the same dicts), its ``state`` both states."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer):
        self.optimizers = (first, second)
        self.defaults = {}
        self.param_groups = first.param_groups + second.param_groups
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @property
    def state(self) -> dict:
        return {**self.optimizers[0].state, **self.optimizers[1].state}

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("OptimizerPair takes no closure")
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D weights of the decoder layers, every other parameter: embeddings, output head, norms): Muon's usual split."""
    hidden, rest = [], []
    for name, parameter in model.named_parameters():
        is_hidden = parameter.ndim == 2 and "embed" not in name and "lm_head" not in name
        (hidden if is_hidden else rest).append(parameter)
    return hidden, rest


def _muon(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
    """torch.optim.Muon (Nesterov momentum 0.95, 5 Newton-Schulz steps, ``adjust_lr_fn="match_rms_adamw"`` so one lr
    serves both) on the hidden matrices, torch.optim.AdamW on the rest, both at the run's lr."""
    hidden, rest = hidden_matrices(model)
    muon = torch.optim.Muon(hidden, lr=settings.lr, weight_decay=settings.weight_decay, adjust_lr_fn="match_rms_adamw")
    return OptimizerPair(muon, torch.optim.AdamW(rest, lr=settings.lr, weight_decay=settings.weight_decay))


def _adamw8bit(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def _svd_groups(model: nn.Module, settings: OptimSettings) -> list[dict]:
    """GaLore's placement: every linear weight but ``lm_head`` projected with SVD, the rest plain AdamW."""
    return make_param_groups(model, rank=settings.rank, update_proj_gap=settings.update_proj_gap, scale=settings.scale,
                             projector="svd", cross_head=False)


def _galore_torch(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
    return galore_torch_adamw(_svd_groups(model, settings), settings.lr, settings.weight_decay)


def _fira(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
    """Fira's own FiraAdamW on GaLore's placement, with its recommended settings: ``alpha`` = our ``scale`` (0.25 by
    default, as in Fira's pre-training scripts), ``proj_type="std"``, its own eps (1e-6)."""
    return fira_adamw(_svd_groups(model, settings), settings.lr, settings.weight_decay)


def _apollo_torch(rank_and_scaling: dict[str, Any]) -> Builder:
    """apollo_torch's APOLLOAdamW on GaLore's placement with its recommended settings (random projection, scale and
    scale_type of ``rank_and_scaling``, its own eps 1e-6 and norm-growth limiter); the rank defaults to ``--rank``."""

    def build(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
        placed = _svd_groups(model, replace(settings, rank=rank_and_scaling.get("rank", settings.rank)))
        return apollo_torch_adamw(placed, settings.lr, settings.weight_decay, **rank_and_scaling)

    return build


# Q-GaLore's projector options (q_galore_torch's defaults: 4-bit projection in groups of 256, lazy refresh by cosine
# similarity); its INT8 weights need its own quantised linear layers and are not used here.
Q_GALORE_OPTIONS = {"proj_type": "std", "quant": True, "quant_n_bit": 4, "quant_group_size": 256, "cos_threshold": 0.4,
                    "gamma_proj": 2, "queue_size": 5}
Q_GALORE_CLASSES = ("QGaLoreAdamW8bit", "QGaLoreAdamW8bit_simulate")


def _q_galore_class() -> tuple[type | None, str]:
    """The first q_galore_torch optimizer that steps a tiny projected weight here, and why the others do not."""
    import q_galore_torch

    errors = []
    for name in Q_GALORE_CLASSES:
        weight = nn.Parameter(torch.randn(64, 64))  # its 16 x 64 projection holds whole quantisation groups of 256
        weight.grad = torch.randn(64, 64)
        optimizer_class = getattr(q_galore_torch, name)
        try:
            optimizer_class([{"params": [weight], "rank": 16, "update_proj_gap": 200, "scale": 0.25, **Q_GALORE_OPTIONS}],
                            lr=1e-3).step()
        except Exception as error:  # the reason is the result: it is shown in the table
            errors.append(f"{name} raises {type(error).__name__}: {error}")
            continue
        return optimizer_class, ""
    return None, "; ".join(errors)


def _q_galore_probe() -> str | None:
    optimizer_class, reason = _q_galore_class()
    return None if optimizer_class is not None else f"q_galore_torch cannot step here ({reason})"


def _q_galore(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
    """q_galore_torch's optimizer (the first that steps here) on GaLore's placement, scale = ``--scale``."""
    optimizer_class, reason = _q_galore_class()
    if optimizer_class is None:
        raise RuntimeError(f"q_galore_torch cannot step here ({reason})")
    return optimizer_class(peer_groups(_svd_groups(model, settings), **Q_GALORE_OPTIONS), lr=settings.lr,
                           weight_decay=settings.weight_decay)


def _pytorch_optimizer(class_name: str, **keys: Any) -> Builder:
    """The ``pytorch-optimizer`` package's ``class_name`` (an independent implementation of GaLore, Fira or APOLLO) on
    GaLore's placement: ``rank``, ``update_proj_gap``, ``scale``, ``projection_type="std"`` and ``keys`` in every
    projected group, its own defaults (eps 1e-6) otherwise."""

    def build(model: nn.Module, settings: OptimSettings, seed: int) -> torch.optim.Optimizer:
        import pytorch_optimizer

        groups = peer_groups(_svd_groups(model, settings), projection_type="std", **keys)
        return getattr(pytorch_optimizer, class_name)(groups, lr=settings.lr, weight_decay=settings.weight_decay)

    return build


def _preset_keys(preset: dict[str, Any]) -> dict[str, Any]:
    """A galore_plus preset's group keys but the rank and gap (the run's ``--rank`` and ``--update-proj-gap`` set those)."""
    return {key: value for key, value in preset.items() if key not in ("rank", "update_proj_gap")}


def _peer_methods() -> list[MethodSpec]:
    """APOLLO, APOLLO-Mini and Q-GaLore from their own packages, and ours of the same ideas, on GaLore's placement.

    The APOLLO pairs share the default learning-rate grid (APOLLO's update has AdamW's scale, not GaLore's 0.25).
    """
    peers = ("peers", "anchors")
    apollo_placement = {"projector": "random", "cross_head": False}
    return [
        MethodSpec("apollo", "apollo_torch.APOLLOAdamW: random projection, channel scaling, scale 1", _apollo_torch(APOLLO_SCALING),
                   requires=("apollo_torch", "transformers"), sets=peers),
        MethodSpec("apollo_mini", "apollo_torch.APOLLOAdamW: rank 1, tensor scaling, scale 128 (APOLLO-Mini)",
                   _apollo_torch(APOLLO_MINI_SCALING), requires=("apollo_torch", "transformers"), sets=peers),
        MethodSpec("q_galore", "q_galore_torch (4-bit projection, lazy refresh), scale = --scale", _q_galore,
                   requires=("q_galore_torch", "bitsandbytes"), probe=_q_galore_probe, sets=peers,
                   lr_grids=PROJECTED_LR_GRIDS),
        replace(galore_plus_method("galore_plus_apollo", "GaLorePlusAdamW, APOLLO preset: projector='random', "
                                   "update_rule='apollo', channel, scale 1, eps 1e-6", sets=peers,
                                   placement=apollo_placement, **_preset_keys(APOLLO)), lr_grids={}),
        replace(galore_plus_method("galore_plus_apollo_mini", "GaLorePlusAdamW, APOLLO_MINI preset: rank 1, tensor "
                                   "scaling, scale 128, eps 1e-6", sets=peers,
                                   placement={**apollo_placement, "rank": APOLLO_MINI["rank"]},
                                   **_preset_keys(APOLLO_MINI)), lr_grids={}),
        MethodSpec("po_galore", "pytorch_optimizer.GaLore on all linear weights (scale = --scale)",
                   _pytorch_optimizer("GaLore"), requires=("pytorch_optimizer",), sets=peers, lr_grids=PROJECTED_LR_GRIDS),
        MethodSpec("po_fira", "pytorch_optimizer.Fira on all linear weights (scale = --scale)",
                   _pytorch_optimizer("Fira"), requires=("pytorch_optimizer",), sets=peers, lr_grids=PROJECTED_LR_GRIDS),
        MethodSpec("po_apollo", "pytorch_optimizer.APOLLO: random projection, channel scaling, scale 1",
                   _pytorch_optimizer("APOLLO", scale_type="channel", scale=1.0), requires=("pytorch_optimizer",),
                   sets=peers),
        galore_plus_method("galore_plus_4bit_bases", "GaLore+ with 4-bit bases and 8-bit moments (Q-GaLore's storage)",
                           sets=("peers",), placement=GALORE_PLUS_PAPER_PLACEMENT, optim_bits=8, residual_mode="exact",
                           basis_bits=4),
    ]


# GaLore+ as the paper describes it: cross_head q/k with the sparse residual, randomized elsewhere, none of the levers.
GALORE_PLUS_PAPER_PLACEMENT = {"projector": "randomized", "cross_head": True, "residual_ratio": HEADLINE_RESIDUAL,
                               "full_rank_residual": False}
# GaLore+ as make_param_groups builds it by default (its projectors then default to Fira's full-rank residual).
GALORE_PLUS_DEFAULT_PLACEMENT: dict[str, Any] = {}


def _residual_ablation() -> list[MethodSpec]:
    """The residual ablation of the paper's Table 8 (``galore_plus_paper`` is its 1.2 % exact point)."""
    specs = [galore_plus_method("galore_plus_res0", "GaLore+ (paper) without residual", sets=("ablation",),
                                placement=dict(GALORE_PLUS_PAPER_PLACEMENT, residual_ratio=0.0))]
    for mode in ("exact", "paper"):
        for ratio in (0.006, 0.012, 0.018):
            if (ratio, mode) == (HEADLINE_RESIDUAL, "exact"):
                continue
            specs.append(galore_plus_method(f"galore_plus_res{ratio}_{mode}", f"GaLore+ (paper) with residual {ratio:.1%}, "
                                            f"{mode} mode", sets=("ablation",),
                                            placement=dict(GALORE_PLUS_PAPER_PLACEMENT, residual_ratio=ratio),
                                            residual_mode=mode))
    return specs


SVD_PLACEMENT = {"projector": "svd", "cross_head": False}


LEVERS = {
    "mt": ("moment transfer", {"moment_transfer": True}),
    "frr": ("Fira's full-rank residual", {"full_rank_residual": True}),
    "mt_frr": ("moment transfer + full-rank residual", {"moment_transfer": True, "full_rank_residual": True}),
    "auto": ("scale='auto'", {"scale": "auto"}),
    "adaptive": ("adaptive refresh gap", {"adaptive_gap": True}),
    "adaptive_p1": ("adaptive refresh gap, doubling after 1 stable refresh", {"adaptive_gap": True, "gap_patience": 1}),
    "nolimit": ("Fira's residual without its norm-growth limiter", {"norm_growth_limit": None}),
    "mt_auto_adaptive": ("moment transfer + scale='auto' + adaptive refresh gap",
                         {"moment_transfer": True, "scale": "auto", "adaptive_gap": True}),
}


PROJECTION_LEVERS = {suffix: LEVERS[suffix] for suffix in ("mt", "frr", "mt_frr", "auto", "adaptive", "adaptive_p1")}


def _lever_methods() -> list[MethodSpec]:
    """Each lever of docs/levers.md alone and together on GaLore (svd) and on the paper's GaLore+; the levers that are
    not defaults on default GaLore+ (which has the full-rank residual; without it, it is ``galore_plus_res0``);
    cross-head head counts."""
    specs = []
    for base, description, placement, levers in (
            ("galore", "GaLore (svd)", SVD_PLACEMENT, PROJECTION_LEVERS),
            ("galore_plus_paper", "GaLore+ (paper)", GALORE_PLUS_PAPER_PLACEMENT, PROJECTION_LEVERS),
            ("galore_plus", "GaLore+ (defaults)", GALORE_PLUS_DEFAULT_PLACEMENT,
             {suffix: LEVERS[suffix] for suffix in ("mt", "auto", "adaptive", "adaptive_p1", "nolimit",
                                                    "mt_auto_adaptive")})):
        for suffix, (lever, keys) in levers.items():
            specs.append(galore_plus_method(f"{base}_{suffix}", f"{description} + {lever}", sets=("levers",),
                                            placement=placement, **keys))
    for heads in (1, 2, 4):
        specs.append(galore_plus_method(f"galore_plus_heads{heads}", f"GaLore+ (defaults) with cross-head bases from "
                                        f"{heads} head(s)", sets=("heads",), cross_head_heads=heads))
    return specs


METHODS: list[MethodSpec] = [
    MethodSpec("adamw", "torch.optim.AdamW, all parameters", _adamw),
    MethodSpec("muon", "torch.optim.Muon on the hidden matrices (match_rms_adamw), AdamW on embeddings, head, norms",
               _muon, lr_grids=MUON_LR_GRIDS),
    MethodSpec("adamw8bit", "bitsandbytes.optim.AdamW8bit, all parameters", _adamw8bit, requires=("bitsandbytes",),
               sets=("8bit", "anchors")),
    galore_plus_method("galore", "GaLorePlusAdamW, projector='svd' on all linear weights (GaLore)",
                       placement={"projector": "svd", "cross_head": False}),
    MethodSpec("galore_torch", "galore_torch.GaLoreAdamW on all linear weights", _galore_torch, requires=("galore_torch",),
               lr_grids=PROJECTED_LR_GRIDS, sets=("anchors",)),
    MethodSpec("fira", "fira.FiraAdamW on all linear weights (alpha = scale, proj_type std)", _fira,
               requires=("fira", "transformers"), lr_grids=PROJECTED_LR_GRIDS, sets=("anchors",)),
    galore_plus_method("galore_plus", "GaLore+ with make_param_groups' defaults: cross_head q/k, randomized elsewhere, "
                       "Fira's full-rank residual", placement=GALORE_PLUS_DEFAULT_PLACEMENT),
    galore_plus_method("galore_plus_no_frr", "GaLore+ defaults without Fira's full-rank residual",
                       placement=GALORE_PLUS_DEFAULT_PLACEMENT, sets=("anchors",), full_rank_residual=False),
    galore_plus_method("galore_plus_paper", "GaLore+ as the paper: cross_head q/k with 1.2 % sparse residual (exact), "
                       "randomized elsewhere, no full-rank residual", placement=GALORE_PLUS_PAPER_PLACEMENT,
                       residual_mode="exact", sets=("anchors",)),
    replace(galore_plus_method("galore_plus_muon", "GaLore+ placement with update_rule='muon': Nesterov momentum of R "
                               "(b1 0.95), P N + (G - P R) orthogonalised by Newton-Schulz, scale 1",
                               placement=GALORE_PLUS_DEFAULT_PLACEMENT, sets=("default", "levers"),
                               update_rule="muon", scale=1.0, betas=(0.95, 0.999)), lr_grids=MUON_LR_GRIDS),
    replace(galore_plus_method("galore_muon", "svd placement (GaLore) with update_rule='muon' (b1 0.95, scale 1)",
                               placement=SVD_PLACEMENT, sets=("levers",), update_rule="muon", scale=1.0,
                               betas=(0.95, 0.999)), lr_grids=MUON_LR_GRIDS),
    replace(galore_plus_method("galore_plus_frugal", "GaLore+ placement with update_rule='frugal': Adam in the subspace "
                               "(scale 1, as FRUGAL) plus signSGD of G - P R at the same lr, in place of Fira's residual",
                               placement=GALORE_PLUS_DEFAULT_PLACEMENT, sets=("levers",), update_rule="frugal",
                               scale=1.0), lr_grids=FIELD_LR_GRIDS),
    replace(galore_plus_method("galore_frugal", "svd placement (GaLore) with update_rule='frugal' (scale 1, "
                               "free_lr_ratio 1)", placement=SVD_PLACEMENT, sets=("levers",), update_rule="frugal",
                               scale=1.0), lr_grids=FIELD_LR_GRIDS),
    galore_plus_method("galore_plus_ldadam", "GaLore+ placement with update_rule='ldadam': GaLore's update (scale 0.25) "
                       "with LDAdam's error feedback of G + E - P R, in place of Fira's residual",
                       placement=GALORE_PLUS_DEFAULT_PLACEMENT, sets=("levers",), update_rule="ldadam"),
    replace(galore_plus_method("galore_plus_scale", "GaLore+ placement with update_rule='scale': momentum of R (b1 0.9), "
                               "P N + (G - P R) column-normalised (SCALE), RMS-matched to AdamW, scale 1",
                               placement=GALORE_PLUS_DEFAULT_PLACEMENT, sets=("levers",), update_rule="scale",
                               scale=1.0), lr_grids=MUON_LR_GRIDS),
    galore_plus_method("galore_plus_8bit", "GaLore+ (defaults) with 8-bit moments", placement=GALORE_PLUS_DEFAULT_PLACEMENT,
                       optim_bits=8, sets=("8bit",)),
    adapter_method("lora", "LoRA adapters (galore_plus.adapters) on all linear layers, AdamW", "lora", sets=("adapters",)),
    adapter_method("dora", "DoRA adapters (galore_plus.adapters) on all linear layers, AdamW", "dora", sets=("adapters",)),
    adapter_method("vera", "VeRA adapters (galore_plus.adapters) on all linear layers, AdamW", "vera", sets=("adapters",)),
    adapter_method("dvora", "DVoRA adapters (DoRA magnitude + VeRA direction) on all linear layers, AdamW", "dvora",
                   sets=("adapters",)),
    adapter_method("hydra", "Hydra adapters (parallel + sequential low-rank branches) on all linear layers, AdamW",
                   "hydra", sets=("adapters",)),
    adapter_method("dylora", "DyLoRA adapters (rank sampled per step in [1, r]; test loss at several ranks below), "
                   "AdamW", "dylora", sets=("adapters",), variants=dylora_ranks),
    adapter_method("adalora", "AdaLoRA adapters (initial rank r pruned to 2r/3 by importance, orthogonality "
                   "regulariser; state includes its importance averages), AdamW", "adalora",
                   sets=("adapters",), options=adalora_schedule),
    *_residual_ablation(),
    *_peer_methods(),
    *_lever_methods(),
]

ALL_METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in METHODS}
if len(ALL_METHODS) != len(METHODS):
    raise RuntimeError("two entries of METHODS share a name")


def method_sets() -> dict[str, list[str]]:
    """Set name -> method names: ``all`` and every set a spec names (``default``, ``ablation``, ...)."""
    sets: dict[str, list[str]] = {"all": list(ALL_METHODS)}
    for spec in METHODS:
        for name in spec.sets:
            sets.setdefault(name, []).append(spec.name)
    clashes = set(sets) & set(ALL_METHODS)
    if clashes:
        raise RuntimeError(f"method sets named like methods would hide them in --methods: {sorted(clashes)}")
    return sets


def resolve_methods(names: list[str]) -> list[MethodSpec]:
    """Method specs for names and set names, in order, without repeats."""
    sets = method_sets()
    resolved: list[str] = []
    for name in names:
        for item in sets.get(name, [name]):
            if item not in ALL_METHODS:
                raise ValueError(f"unknown method {item!r}; known methods: {', '.join(ALL_METHODS)}; "
                                 f"sets: {', '.join(sets)}")
            if item not in resolved:
                resolved.append(item)
    return [ALL_METHODS[name] for name in resolved]


def _group_keys_reason(group_keys: dict[str, Any]) -> str | None:
    """Why GaLorePlusAdamW cannot take ``group_keys`` (a key it does not know, or a value it rejects), or None."""
    unknown = [key for key in group_keys if key not in projected_group_defaults() and key not in CONSTRUCTOR_HYPERPARAMETERS]
    if unknown:
        return f"GaLorePlusAdamW has no group key {', '.join(map(repr, unknown))} yet"
    weight = nn.Parameter(torch.zeros(8, 8))
    group = {"params": [weight], "rank": 2, **group_keys}
    for key in unread_keys(group):   # read by another projector (cross_head_heads): the build sets it only there
        del group[key]
    try:
        GaLorePlusAdamW([group])
    except (ValueError, TypeError) as error:
        return f"GaLorePlusAdamW rejects the group keys {group_keys}: {error}"
    return None


def unavailable_reason(spec: MethodSpec) -> str | None:
    """Why ``spec`` cannot run in this environment, or None when it can."""
    missing = [module for module in spec.requires if importlib.util.find_spec(module) is None]
    if missing:
        return f"{', '.join(missing)} is not installed (pip install {' '.join(m.replace('_', '-') for m in missing)})"
    if spec.probe is not None:
        reason = spec.probe()
        if reason is not None:
            return reason
    return _group_keys_reason(spec.group_keys) if spec.group_keys else None
