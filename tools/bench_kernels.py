"""Benchmark mer's SwiGLU expert kernels on the Mixtral expert shape, beside ggml and numpy.

    python tools/bench_kernels.py [--quick] [--json] [--repeats N]

For a random valid q4_0 expert (d_model 4096, d_ff 14336: 99 MB) it times one expert call for
batches of 1, 8 and 32 tokens, on one thread and on all cores of this process's affinity:

- mer, planar layout and native layout (`mer.compute.swiglu.swiglu_expert`);
- ggml's own kernels on the same native bytes (`tools/ggml_reference.py`, through
  llama-cpp-python's libggml), when llama-cpp-python is importable;
- once, batch 1: numpy (gguf.quants.dequantize of the three matrices, then np.dot).

The methods are run interleaved, `--repeats` times each, and medians are reported, with the
ratio mer / ggml of each configuration (the host is shared and noisy: compare ratios). Prints a
table, or with `--json` one JSON object, on stdout; progress goes to stderr.
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
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per method and configuration (default 7, quick 3)"
    )
    parser.add_argument("--dtype", default="q4_0", choices=("q4_0", "q8_0", "mxfp4"), help="weight dtype of the expert")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_payloads(dtype: str) -> tuple[ExpertPayload, ExpertPayload]:
    """(native, planar) payloads of one random expert."""
    native_format = ExpertFormat.build(D_MODEL, D_FF, (dtype,) * 3, "native")
    planar_format = ExpertFormat.build(D_MODEL, D_FF, (dtype,) * 3, "planar")
    native = random_expert_payload(native_format, 2026)
    planar = np.empty_like(native)
    for matrix in native_format.matrices:
        part = slice(matrix.offset, matrix.offset + matrix.nbytes)
        planar[part] = to_planar(dtype, native[part], matrix.rows, matrix.columns)
    return ExpertPayload(native_format, native), ExpertPayload(planar_format, planar)


def ggml_factory(dtype: str, payload: np.ndarray) -> tuple[Callable[[int], object] | None, str]:
    """A function making a GgmlExpert for a batch size, or None and why ggml is skipped."""
    try:
        from ggml_reference import GgmlExpert

        probe = GgmlExpert(payload, D_MODEL, D_FF, dtype, 1)
        probe.close()
    except (ImportError, OSError, AttributeError) as error:
        return None, f"ggml skipped: {type(error).__name__}: {error}"
    note = "ggml via llama-cpp-python's libggml"
    return (lambda batch: GgmlExpert(payload, D_MODEL, D_FF, dtype, batch)), note


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


def run(arguments: argparse.Namespace) -> dict:
    repeats = arguments.repeats or (3 if arguments.quick else 7)
    batches = (1, 8) if arguments.quick else (1, 8, 32)
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
    report = run(arguments)
    if arguments.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
