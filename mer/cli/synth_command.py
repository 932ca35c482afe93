"""`mer-pipeline synth`: write a deterministic synthetic expert store of any geometry."""

from __future__ import annotations

import argparse
import json

from mer.cli.flag_types import positive_int, seed
from mer.cli.progress import ProgressDisplay
from mer.errors import ConfigError
from mer.logging_setup import configure_logging
from mer.compute.expert_format import LAYOUTS
from mer.store.presets import PRESETS
from mer.store.synth import SynthSpec, synth_store

# CLI flag -> SynthSpec field, for the geometry flags a preset provides.
GEOMETRY_FLAGS = {"layers": "num_layers", "experts": "experts_per_layer", "top_k": "top_k", "d_model": "d_model",
                  "d_ff": "d_ff", "dtype": "dtypes"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic expert store (random valid weights)",
        description="Write a synthetic expert store of any geometry with random but valid weights. "
        "The same flags and seed always give a byte-identical store. Give either every geometry flag "
        "or --preset; explicit flags override the preset's values.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named geometry: "
                        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    parser.add_argument("--layers", type=positive_int, help="number of MoE layers")
    parser.add_argument("--experts", type=positive_int, help="experts per layer (not in total)")
    parser.add_argument("--top-k", type=positive_int, help="experts chosen per token and layer")
    parser.add_argument("--d-model", type=positive_int, help="model width in elements (columns of gate/up)")
    parser.add_argument("--d-ff", type=positive_int, help="expert hidden size in elements (columns of down)")
    parser.add_argument("--dtype", help="weight dtype, lower-case GGUF name (q4_0, q8_0, q4_k, q5_k, q6_k, "
                        "f16, bf16, f32), or three comma-separated ones for gate,up,down")
    parser.add_argument("--out", required=True, help="output store directory (written atomically)")
    parser.add_argument("--seed", type=seed, default=0, help="generator seed, 0..2**64-1 (default 0)")
    parser.add_argument("--layout", choices=LAYOUTS, default="native",
                        help="payload matrix layout: native GGUF blocks or planar (default native)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object {out, experts, bytes, payload_bytes, seconds} on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=run)


def parse_dtypes(text: str) -> tuple[str, str, str]:
    """`q4_0` -> (q4_0, q4_0, q4_0); `q4_k,q4_k,q6_k` -> one dtype per matrix."""
    names = [name.strip().lower() for name in text.split(",")]
    if len(names) == 1:
        return (names[0],) * 3  # type: ignore[return-value]
    if len(names) != 3:
        raise ConfigError(f"--dtype {text!r}: give one dtype or three (gate,up,down)")
    return names[0], names[1], names[2]


def spec_from_args(args: argparse.Namespace) -> SynthSpec:
    """The SynthSpec the flags describe (a preset's values replaced by explicit flags)."""
    given = {field: getattr(args, flag) for flag, field in GEOMETRY_FLAGS.items() if getattr(args, flag) is not None}
    if "dtypes" in given:
        given["dtypes"] = parse_dtypes(given["dtypes"])
    if args.preset:
        return SynthSpec.from_preset(args.preset, seed=args.seed, layout=args.layout, **given)
    missing = [f"--{flag.replace('_', '-')}" for flag, field in GEOMETRY_FLAGS.items() if field not in given]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (or give --preset)")
    return SynthSpec(seed=args.seed, layout=args.layout, **given)


def run(args: argparse.Namespace) -> int:
    configure_logging("mer-synth")  # warnings (a reclaimed partial store) as JSON on stderr, never on stdout
    spec = spec_from_args(args)
    with ProgressDisplay("synth", enabled=not args.quiet) as display:
        result = synth_store(spec, args.out, force=args.force, start_phase=display.start_phase)
    if args.json:
        print(json.dumps({"out": str(result.out), "experts": result.num_experts, "bytes": result.nbytes,
                          "payload_bytes": result.payload_nbytes, "seconds": round(result.seconds, 3)}))
    else:
        print(f"wrote {result.num_experts} experts ({result.nbytes:,} bytes) to {result.out} "
              f"in {result.seconds:.1f} s")
    return 0
