"""Named expert geometries of real MoE models, for synthetic stores (`mer-pipeline synth --preset`).

Only the expert part of each model matters here: MoE layers, experts per layer, top-k, d_model
and the expert hidden size d_ff. `--experts` is always experts *per layer*.
"""

from __future__ import annotations

from dataclasses import dataclass

from mer.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """The expert geometry and default dtype of one model."""

    name: str
    num_layers: int
    experts_per_layer: int
    top_k: int
    d_model: int
    d_ff: int
    dtype: str
    description: str


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("mixtral-8x7b", 32, 8, 2, 4096, 14336, "q4_0",
               "Mixtral 8x7B: 256 experts of 99,090,432 bytes in q4_0 (~25 GB)"),
        Preset("qwen3-30b-a3b", 48, 128, 8, 2048, 768, "q4_0",
               "Qwen3-30B-A3B: 6,144 small experts of 2,654,208 bytes in q4_0 (~16 GB)"),
        Preset("olmoe", 16, 64, 8, 2048, 1024, "q4_0",
               "OLMoE-1B-7B: 1,024 experts of 3,538,944 bytes in q4_0 (~3.6 GB)"),
        Preset("tiny", 2, 8, 2, 256, 512, "q4_0",
               "a tiny store for tests and demos: 16 experts of 221,184 bytes in q4_0"),
    )
}


def preset_by_name(name: str) -> Preset:
    """The preset called `name`, or a ConfigError listing the known names."""
    preset = PRESETS.get(name.lower())
    if preset is None:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return preset
