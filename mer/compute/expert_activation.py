"""The gated activation of an expert's hidden units: `h = act(gate · x [+ b_gate], up · x [+ b_up])`.

- "silu" (Mixtral, Qwen-MoE, OLMoE): `silu(g) * u`, `silu(g) = g / (1 + exp(-g))`;
- "swiglu_oai" (gpt-oss, ggml's `ggml_swiglu_oai` with alpha 1.702 and limit 7): `x = min(g, 7)`,
  `y = clamp(u, -7, 7)`, `x * sigmoid(1.702 x) * (y + 1)`, computed in float32 as ggml does
  (`x / (1 + exp(-1.702 x)) * (y + 1)`).

`EXPERT_ACTIVATIONS` maps each architecture whose experts are not "silu" to its activation.
"""

from __future__ import annotations

import numpy as np

from mer.errors import ShapeError

ACTIVATIONS = ("silu", "swiglu_oai")
EXPERT_ACTIVATIONS = {"gpt-oss": "swiglu_oai"}
OAI_ALPHA = np.float32(1.702)
OAI_LIMIT = np.float32(7.0)


def expert_activation_of(architecture: str) -> str:
    """The activation of `architecture`'s experts."""
    return EXPERT_ACTIVATIONS.get(architecture, "silu")


def silu_gate(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """`silu(gate) * up` in float32 (silu(g) = g / (1 + exp(-g)))."""
    with np.errstate(over="ignore"):
        return (gate / (np.float32(1) + np.exp(-gate))) * up


def swiglu_oai(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gpt-oss's clamped SwiGLU (see the module) in float32."""
    x = np.minimum(gate, OAI_LIMIT)
    y = np.clip(up, -OAI_LIMIT, OAI_LIMIT)
    with np.errstate(over="ignore"):
        glu = x / (np.float32(1) + np.exp(OAI_ALPHA * -x))
    return glu * (y + np.float32(1))


def activate(activation: str, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """`activation` ("silu" or "swiglu_oai") of the gate and up projections."""
    if activation == "silu":
        return silu_gate(gate, up)
    if activation == "swiglu_oai":
        return swiglu_oai(gate, up)
    raise ShapeError(f"expert activation {activation!r} is not one of {ACTIVATIONS}")
