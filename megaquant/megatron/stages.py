"""Pipeline stages: which decoder layers a pipeline rank builds (pure arithmetic, testable).

Pipeline parallelism (``parallel.pp = P``) cuts the decoder into P consecutive runs of layers.
Stage 0 also holds the embedding (Megatron's ``pre_process``), stage P-1 the final norm, the
output layer and the loss (``post_process``). With tied embeddings the output layer of the last
stage is a copy of the first stage's embedding, kept equal by Megatron's embedding group.

The split is Megatron's: ``num_layers / P`` layers per stage, or, for uneven splits, a given
number on the first and/or last stage (``parallel.pp_first_layers`` /
``parallel.pp_last_layers``, Megatron's ``num_layers_in_first/last_pipeline_stage``) and the
rest divided evenly over the middle stages. ``split_layers`` computes the same numbers Megatron's
``get_num_layers_to_build`` does, so a bad request fails here, naming the sizes and what would
fit, instead of in an assert inside Megatron.

Layer numbering: a stage's modules are numbered from 0 (``decoder.layers.0``), while its
checkpoint keys carry global layer numbers (``sharded_offsets``), so a checkpoint saved at one
PP size loads at any other. ``stage_state`` renumbers a full-model state dict (HF weights
mapped to Megatron names) to one stage's local names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class StageLayout:
    """One pipeline rank's share of the model."""

    pp: int
    pp_rank: int
    first_layer: int  # global index of this stage's first decoder layer
    num_layers: int  # decoder layers on this stage
    sizes: tuple[int, ...] = ()  # layers of every stage (the whole split)

    @property
    def pre_process(self) -> bool:
        return self.pp_rank == 0

    @property
    def post_process(self) -> bool:
        return self.pp_rank == self.pp - 1


def _even_options(num_layers: int, pp: int) -> str:
    fits = [p for p in range(1, num_layers + 1) if num_layers % p == 0]
    return (f"parallel.pp in {fits}, or an uneven split with parallel.pp_first_layers / "
            "parallel.pp_last_layers")


def split_layers(num_layers: int, pp: int, first: Optional[int] = None,
                 last: Optional[int] = None) -> list[int]:
    """Decoder layers per stage, as Megatron builds them; ValueError naming what would fit."""
    if pp < 1:
        raise ValueError(f"parallel.pp must be >= 1, got {pp}")
    if pp == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise ValueError("parallel.pp_first_layers / pp_last_layers need parallel.pp > 1")
        return [num_layers]
    if pp > num_layers:
        raise ValueError(f"the model has {num_layers} layers: parallel.pp={pp} would leave "
                         f"stages without layers; use parallel.pp <= {num_layers}")
    for name, value in (("pp_first_layers", first), ("pp_last_layers", last)):
        if value is not None and not 1 <= value < num_layers:
            raise ValueError(f"parallel.{name}={value} must be in 1..{num_layers - 1} "
                             f"(the model has {num_layers} layers)")
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(f"the model has {num_layers} layers, which parallel.pp={pp} "
                             f"stages cannot share evenly; use {_even_options(num_layers, pp)}")
        return [num_layers // pp] * pp
    rest = num_layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    if rest < 0 or (middle == 0 and rest != 0) or (middle > 0 and (rest <= 0 or rest % middle)):
        raise ValueError(
            f"the model has {num_layers} layers: pp_first_layers={first}, pp_last_layers={last} "
            f"leave {rest} layers for {middle} other stage(s) of parallel.pp={pp}, which must "
            "get the same number (>= 1) each")
    sizes = [rest // middle if middle else 0] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def stage_layout(num_layers: int, pp: int, pp_rank: int, first: Optional[int] = None,
                 last: Optional[int] = None) -> StageLayout:
    """The layout of pipeline rank ``pp_rank`` (see ``split_layers``)."""
    sizes = split_layers(num_layers, pp, first, last)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, {pp})")
    return StageLayout(pp, pp_rank, sum(sizes[:pp_rank]), sizes[pp_rank], tuple(sizes))


def stage_state(state: dict, layout: StageLayout, tied: bool) -> dict:
    """The entries of a full-model Megatron state dict that this stage owns, renamed locally.

    Decoder layers are renumbered from the stage's first layer; the embedding stays on the
    first stage, the final norm and output layer on the last. With tied embeddings the last
    stage (if it is not also the first) gets the embedding as ``output_layer.weight``.
    """
    out = {}
    lo, hi = layout.first_layer, layout.first_layer + layout.num_layers
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match:
            n = int(match.group(1))
            if lo <= n < hi:
                out[f"decoder.layers.{n - lo}.{match.group(2)}"] = value
        elif key.startswith("embedding."):
            if layout.pre_process:
                out[key] = value
        elif layout.post_process:  # decoder.final_layernorm.*, output_layer.*
            out[key] = value
    if tied and layout.post_process and not layout.pre_process:
        out["output_layer.weight"] = state["embedding.word_embeddings.weight"]
    return out


def global_name(name: str, layout: StageLayout) -> str:
    """A module name of this stage with its decoder layer number made global."""
    match = re.match(r"^(.*?decoder\.layers\.)(\d+)(\..*)?$", name)
    if match is None:
        return name
    return f"{match.group(1)}{int(match.group(2)) + layout.first_layer}{match.group(3) or ''}"


def gather_report(report, layout: StageLayout, pp_group) -> None:
    """Make a conversion report (``convert.ConversionReport``) describe the whole model: every
    stage's layers, under global names, on every rank (collective over ``pp_group``)."""
    import torch.distributed as dist

    mine = ({global_name(k, layout): v for k, v in report.enabled_quantizers.items()},
            {global_name(k, layout): v for k, v in report.skipped.items()},
            report.calibration.get("calibrated_quantizers", 0))
    parts: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, mine, group=pp_group)
    report.enabled_quantizers = {k: v for enabled, _, _ in parts for k, v in enabled.items()}
    report.skipped = {k: v for _, skipped, _ in parts for k, v in skipped.items()}
    if "calibrated_quantizers" in report.calibration:
        report.calibration["calibrated_quantizers"] = sum(n for _, _, n in parts)
