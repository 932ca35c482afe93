"""Routing decisions and the space they are drawn from.

A routing decision names the k experts (and their gate weights) that one token uses in one MoE
layer. The benchmark draws decisions in one of two spaces:

- the flat pool (the seed's benchmark): all `num_layers x experts_per_layer` layer-qualified
  experts form one pool; every token makes ONE decision, recorded as layer 0, whose ids are global
  store ids (`moe_layer * experts_per_layer + expert`, as in the store manifest);
- layered: every token makes one decision per MoE layer, in layer order, with ids within the layer.

`RoutingSpace.decision_layers` and `experts_per_decision` are what a trace header records for the
space: a flat pool is one layer of `num_layers x experts_per_layer` experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mer.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from mer.store.manifest import Geometry


@dataclass(frozen=True)
class RoutingDecision:
    """The experts one token uses in one layer (or in the flat pool, recorded as layer 0)."""

    token: int
    layer: int
    experts: tuple[int, ...]  # ids within the layer; global store ids for the flat pool
    weights: tuple[float, ...]  # gate weights, one per expert, in the same order
    # the token's residual stream at this layer (float32 [d_model]) when a model made the decision
    # and it was recorded (`generate --record-hidden`); the gate predictor replays from it
    hidden: "np.ndarray | None" = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RoutingSpace:
    """Where decisions are drawn: the flat pool of all layer-qualified experts, or per layer."""

    num_layers: int  # MoE layers in the store
    experts_per_layer: int
    top_k: int  # experts per decision (the routing k)
    layered: bool = False  # one decision per layer per token instead of one over the flat pool

    def __post_init__(self) -> None:
        for name in ("num_layers", "experts_per_layer", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.experts_per_decision:
            pool = "experts per layer" if self.layered else "experts in the flat pool"
            raise ConfigError(
                f"top_k {self.top_k} exceeds the {self.experts_per_decision} {pool}: "
                f"a decision needs k distinct experts"
            )

    @classmethod
    def from_geometry(cls, geometry: "Geometry", top_k: int, layered: bool = False) -> "RoutingSpace":
        """The routing space of a store's geometry (its MoE layers and experts per layer)."""
        return cls(geometry.num_moe_layers, geometry.experts_per_layer, top_k, layered)

    @property
    def num_experts(self) -> int:
        """Experts in the store: every layer's experts."""
        return self.num_layers * self.experts_per_layer

    @property
    def decision_layers(self) -> int:
        """Decisions per token: one per MoE layer when layered, else one over the flat pool."""
        return self.num_layers if self.layered else 1

    @property
    def experts_per_decision(self) -> int:
        """How many experts one decision chooses among."""
        return self.experts_per_layer if self.layered else self.num_experts

    @property
    def lookups_per_token(self) -> int:
        return self.decision_layers * self.top_k

    def global_ids(self, decision: RoutingDecision) -> tuple[int, ...]:
        """The store ids of a decision's experts (`layer * experts_per_layer + expert` when layered)."""
        if not self.layered:
            return decision.experts
        offset = decision.layer * self.experts_per_layer
        return tuple(offset + expert for expert in decision.experts)
