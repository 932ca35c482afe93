"""Benchmark mer's SwiGLU expert kernels on the Mixtral expert shape, beside ggml and numpy.

    python tools/bench_kernels.py [--quick] [--json] [--repeats N] [--dtype D]

For a random valid expert (d_model 4096, d_ff 14336; q4_0 by default: 99 MB; `--dtype` q8_0,
q4_k, q5_k, q6_k, or three comma-separated dtypes for gate, up and down such as
q4_k,q4_k,q6_k, the Q4_K_M mix) it times one expert call for batches of 1, 8 and 32 tokens, on
one thread and on all cores of this process's affinity:

- mer, planar layout and native layout (`mer.compute.swiglu.swiglu_expert`);
- ggml's own kernels on the same native bytes (`tools/ggml_reference.py`, through
  llama-cpp-python's libggml), when llama-cpp-python is importable;
- once, batch 1: numpy (gguf.quants.dequantize of the three matrices, then np.dot).

The methods are run interleaved, `--repeats` times each, and medians are reported, with the
ratio mer / ggml of each configuration (the host is shared and noisy: compare ratios). Prints a
table, or with `--json` one JSON object, on stdout; progress goes to stderr.

`--dtype all` times every dtype (q4_0, q8_0, q4_k, q5_k, q6_k and the q4_k,q4_k,q6_k mix), mer
(native layout, what `convert` writes) beside ggml, the dtypes taking turns inside each
configuration, and reports each one's time per weight byte and its ratio to q4_0's time per
weight byte measured in the same run (the kernels' goal: within 1.3x), and to ggml's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # numba's idle threads must not spin beside ggml's

import numpy as np  # noqa: E402

from mer.compute.expert_format import ExpertFormat, ExpertPayload  # noqa: E402
from mer.quant.planar import to_planar  # noqa: E402
from mer.quant.random_blocks import random_expert_payload  # noqa: E402
from mer.quant.vector_ir import fastest_kernel  # noqa: E402
from mer.compute.swiglu import swiglu_expert  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
D_MODEL, D_FF = 4096, 14336
ALL_DTYPES = ("q4_0", "q8_0", "q4_k", "q5_k", "q6_k", "q4_k,q4_k,q6_k")
SINGLE_DTYPES = ALL_DTYPES[:5] + ("mxfp4",)
KERNEL_DESCRIPTIONS = {
    "vnni": "vnni (AVX-512 VNNI intrinsics)",
    "avx2": "avx2 (AVX2 + FMA + F16C intrinsics)",
    "portable": "portable (plain numba)",
}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="batches 1 and 8 only, 3 repeats, no native layout"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--batches", type=batch_list, default=None,
                        help="comma-separated token batches (default 1,8,32; --quick 1,8), e.g. 32,128,512 for prefill")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per method and configuration (default 7, quick 3)"
    )
    parser.add_argument(
        "--dtype", default="q4_0", type=dtype_spec,
        help="weight dtype of the expert (q4_0, q8_0, q4_k, q5_k, q6_k, mxfp4), three comma-separated ones "
        "(gate,up,down), or 'all' for every dtype beside q4_0 and ggml",
    )
    return parser.parse_args(argv)


def batch_list(text: str) -> tuple[int, ...]:
    """Positive token counts, comma-separated."""
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive token counts")
    return batches


def dtype_spec(text: str) -> str:
    """`text` if it names one dtype, three comma-separated ones, or 'all'."""
    names = text.split(",")
    if text == "all" or (len(names) in (1, 3) and all(name in SINGLE_DTYPES for name in names)):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {SINGLE_DTYPES}, three of them comma-separated, or 'all'")


def matrix_dtypes(spec: str) -> tuple[str, str, str]:
    names = tuple(spec.split(","))
    return names * 3 if len(names) == 1 else names  # type: ignore[return-value]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_payloads(spec: str) -> tuple[ExpertPayload, ExpertPayload]:
    """(native, planar) payloads of one random expert (K-quants: planar = native bytes)."""
    dtypes = matrix_dtypes(spec)
    native_format = ExpertFormat.build(D_MODEL, D_FF, dtypes, "native")
    planar_format = ExpertFormat.build(D_MODEL, D_FF, dtypes, "planar")
    native = random_expert_payload(native_format, 2026)
    planar = np.empty_like(native)
    for matrix in native_format.matrices:
        part = slice(matrix.offset, matrix.offset + matrix.nbytes)
        planar[part] = to_planar(matrix.dtype, native[part], matrix.rows, matrix.columns)
    return ExpertPayload(native_format, native), ExpertPayload(planar_format, planar)


def ggml_factory(spec: str, payload: np.ndarray) -> tuple[Callable[[int], object] | None, str]:
    """A function making a GgmlExpert for a batch size, or None and why ggml is skipped."""
    dtypes = matrix_dtypes(spec)
    try:
        from ggml_reference import GgmlExpert

        probe = GgmlExpert(payload, D_MODEL, D_FF, dtypes, 1)
        probe.close()
    except (ImportError, OSError, AttributeError) as error:
        return None, f"ggml skipped: {type(error).__name__}: {error}"
    note = "ggml via llama-cpp-python's libggml"
    return (lambda batch: GgmlExpert(payload, D_MODEL, D_FF, dtypes, batch)), note


def median_ms(samples: list[float]) -> float:
    return float(np.median(samples) * 1e3)


def time_interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each method, the methods taking turns."""
    for method in methods.values():
        method()  # warm up (compilation, page faults)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            samples[name].append(time.perf_counter() - start)
    return {name: median_ms(values) for name, values in samples.items()}


def numpy_baseline_ms(payload: ExpertPayload, x: np.ndarray) -> float:
    """gguf.quants.dequantize of gate, up and down, then float32 np.dot: one run, batch 1."""
    from gguf.quants import dequantize

    start = time.perf_counter()
    matrices = []
    for matrix in payload.format.matrices:
        raw = payload.matrix_bytes(matrix).reshape(matrix.rows, -1)
        matrices.append(dequantize(raw, matrix.dtype_info.ggml_type))
    gate, up, down = matrices
    gate_out, up_out = np.dot(x, gate.T), np.dot(x, up.T)
    np.dot(gate_out / (1 + np.exp(-gate_out)) * up_out, down.T)
    return (time.perf_counter() - start) * 1e3


def run_all(arguments: argparse.Namespace) -> dict:
    """Every dtype of ALL_DTYPES, mer native beside ggml, interleaved per configuration."""
    repeats = arguments.repeats or (3 if arguments.quick else 7)
    batches = arguments.batches or ((1, 8) if arguments.quick else (1, 8, 32))
    thread_counts = sorted({1, len(os.sched_getaffinity(0))})
    experts, payload_bytes, ggml_note = {}, {}, ""
    for spec in ALL_DTYPES:
        log(f"building a random {spec} expert {D_MODEL}x{D_FF} ...")
        native, _ = make_payloads(spec)
        make_ggml, ggml_note = ggml_factory(spec, native.data)
        experts[spec] = (native, make_ggml)
        payload_bytes[spec] = native.format.payload_nbytes
    rows = []
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, D_MODEL)).astype(np.float32)
        ggml_experts = {spec: make(batch) for spec, (_, make) in experts.items() if make is not None}
        for threads in thread_counts:
            methods: dict[str, Callable[[], object]] = {}
            for spec, (native, _) in experts.items():
                methods[f"mer {spec}"] = lambda native=native: swiglu_expert(native, x, threads=threads)
                if spec in ggml_experts:
                    methods[f"ggml {spec}"] = lambda expert=ggml_experts[spec]: expert.compute(x, threads)
            log(f"batch {batch}, {threads} thread(s): {len(methods)} methods")
            for name, milliseconds in time_interleaved(methods, repeats).items():
                method, spec = name.split(" ")
                rows.append({"method": method, "dtype": spec, "batch": batch, "threads": threads, "ms": milliseconds,
                             "ns_per_weight_byte": milliseconds * 1e6 / payload_bytes[spec]})
        for expert in ggml_experts.values():
            expert.close()
    add_per_byte_ratios(rows)
    return {"shape": {"d_model": D_MODEL, "d_ff": D_FF, "payload_bytes": payload_bytes}, "repeats": repeats,
            "kernel": KERNEL_DESCRIPTIONS[fastest_kernel()], "ggml": ggml_note, "results": rows}


def add_per_byte_ratios(rows: list[dict]) -> None:
    """Each row's time per weight byte over q4_0's (same method, batch, threads), and its time
    over ggml's for the same dtype and configuration."""
    by_key = {(row["method"], row["dtype"], row["batch"], row["threads"]): row for row in rows}
    for row in rows:
        q4_0 = by_key.get((row["method"], "q4_0", row["batch"], row["threads"]))
        row["per_byte_vs_q4_0"] = row["ns_per_weight_byte"] / q4_0["ns_per_weight_byte"] if q4_0 else None
        ggml = by_key.get(("ggml", row["dtype"], row["batch"], row["threads"]))
        row["ratio_to_ggml"] = row["ms"] / ggml["ms"] if ggml else None


def print_all_table(report: dict) -> None:
    print(f"SwiGLU expert {D_MODEL}x{D_FF} per dtype, mer native layout, kernel {report['kernel']}, "
          f"median of {report['repeats']} interleaved runs; {report['ggml']}")
    print(f"{'method':<7}{'dtype':<16}{'batch':>6}{'threads':>8}{'ms':>9}{'ns/B':>8}{'/B vs q4_0':>11}{'vs ggml':>9}")
    for row in sorted(report["results"], key=lambda row: (row["batch"], row["threads"], row["method"] != "mer")):
        per_byte = f"{row['per_byte_vs_q4_0']:.2f}x" if row["per_byte_vs_q4_0"] is not None else "-"
        ratio = f"{row['ratio_to_ggml']:.2f}x" if row["ratio_to_ggml"] is not None else "-"
        print(f"{row['method']:<7}{row['dtype']:<16}{row['batch']:>6}{row['threads']:>8}{row['ms']:>9.2f}"
              f"{row['ns_per_weight_byte']:>8.3f}{per_byte:>11}{ratio:>9}")


def run(arguments: argparse.Namespace) -> dict:
    repeats = arguments.repeats or (3 if arguments.quick else 7)
    batches = arguments.batches or ((1, 8) if arguments.quick else (1, 8, 32))
    all_cores = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, all_cores})
    log(f"building a random {arguments.dtype} expert {D_MODEL}x{D_FF} ...")
    native, planar = make_payloads(arguments.dtype)
    make_ggml, ggml_note = ggml_factory(arguments.dtype, native.data)
    log(ggml_note)
    rows = []
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, D_MODEL)).astype(np.float32)
        ggml_expert = make_ggml(batch) if make_ggml else None
        for threads in thread_counts:
            methods: dict[str, Callable[[], object]] = {
                "mer planar": lambda: swiglu_expert(planar, x, threads=threads),
            }
            if not arguments.quick:
                methods["mer native"] = lambda: swiglu_expert(native, x, threads=threads)
            if ggml_expert is not None:
                methods["ggml"] = lambda: ggml_expert.compute(x, threads)
            log(f"batch {batch}, {threads} thread(s): {', '.join(methods)}")
            for method, milliseconds in time_interleaved(methods, repeats).items():
                rows.append({"method": method, "batch": batch, "threads": threads, "ms": milliseconds})
        if ggml_expert is not None:
            ggml_expert.close()
    add_rates_and_ratios(rows, native.format.payload_nbytes)
    log("numpy baseline (dequantize + np.dot, batch 1, once) ...")
    x = np.random.default_rng(1).standard_normal((1, D_MODEL)).astype(np.float32)
    baseline = numpy_baseline_ms(native, x)
    return {
        "shape": {
            "d_model": D_MODEL,
            "d_ff": D_FF,
            "dtype": arguments.dtype,
            "payload_bytes": native.format.payload_nbytes,
        },
        "repeats": repeats,
        "kernel": KERNEL_DESCRIPTIONS[fastest_kernel()],
        "ggml": ggml_note,
        "results": rows,
        "numpy_batch1_ms": baseline,
    }


def add_rates_and_ratios(rows: list[dict], payload_bytes: int) -> None:
    """GB/s of weight bytes, GMAC/s, and the ratio to ggml's time in the same configuration."""
    ggml_times = {(row["batch"], row["threads"]): row["ms"] for row in rows if row["method"] == "ggml"}
    for row in rows:
        seconds = row["ms"] / 1e3
        row["weight_gb_per_s"] = payload_bytes / seconds / 1e9
        row["gmac_per_s"] = 3 * D_MODEL * D_FF * row["batch"] / seconds / 1e9
        reference = ggml_times.get((row["batch"], row["threads"]))
        row["ratio_to_ggml"] = row["ms"] / reference if reference else None


def print_table(report: dict) -> None:
    shape = report["shape"]
    size = f"{shape['d_model']}x{shape['d_ff']} ({shape['payload_bytes'] / 1e6:.1f} MB)"
    print(f"{shape['dtype']} SwiGLU expert {size}, kernel {report['kernel']}, "
          f"median of {report['repeats']} interleaved runs; {report['ggml']}")
    print(f"{'method':<12}{'batch':>6}{'threads':>8}{'ms':>10}{'GB/s':>8}{'GMAC/s':>9}{'vs ggml':>9}")
    for row in report["results"]:
        ratio = f"{row['ratio_to_ggml']:.2f}x" if row["ratio_to_ggml"] is not None else "-"
        print(f"{row['method']:<12}{row['batch']:>6}{row['threads']:>8}{row['ms']:>10.2f}"
              f"{row['weight_gb_per_s']:>8.1f}{row['gmac_per_s']:>9.1f}{ratio:>9}")
    print(f"numpy (gguf dequantize + np.dot), batch 1: {report['numpy_batch1_ms']:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    report = run_all(arguments) if arguments.dtype == "all" else run(arguments)
    if arguments.json:
        print(json.dumps(report, indent=2))
    elif arguments.dtype == "all":
        print_all_table(report)
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
