"""The embedded model's routing geometry, read once per test process (loading the model costs ~1 s, so
test modules ask for it inside tests, not at import)."""

from __future__ import annotations

import functools
from typing import NamedTuple

from mer.model.model import MoEModel
from mer.models import tiny_model_path


class EmbeddedGeometry(NamedTuple):
    moe_layers: int
    experts_per_layer: int
    d_model: int


@functools.cache
def embedded_geometry() -> EmbeddedGeometry:
    model = MoEModel.load(tiny_model_path())
    return EmbeddedGeometry(len(model.moe_layers), model.hparams.num_experts, model.hparams.d_model)
