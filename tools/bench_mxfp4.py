"""MXFP4 expert kernel against the q4_0 one, per weight byte, in the same run (and ggml's for each).

    python tools/bench_mxfp4.py [--repeats N] [--batches 1,8] [--threads 1] [--kernel auto] [--json]

Random valid experts of the Mixtral shape (d_model 4096, d_ff 14336) in MXFP4 (17 bytes per 32
weights: 93.6 MB) and q4_0 (18 bytes: 99.1 MB, planar layout as mer stores it) run interleaved
through `mer.compute.swiglu.swiglu_expert` with the fastest kernel of this CPU, and through ggml's
kernels (`tools/ggml_reference.py`, native bytes) when llama-cpp-python is importable. Reports
medians, time per weight byte, and the ratio MXFP4 / q4_0 of time per weight byte (the issue's
goal: within 1.3x) for mer and for ggml. The host is shared and noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import ggml_factory, log, make_payloads, time_interleaved  # noqa: E402

from mer.compute.swiglu import swiglu_expert  # noqa: E402
from mer.quant.vector_ir import fastest_kernel  # noqa: E402

D_MODEL = 4096


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method and batch (default 5)")
    parser.add_argument("--batches", default="1,8", help="comma-separated token batch sizes (default 1,8)")
    parser.add_argument("--threads", type=int, default=1, help="kernel threads (default 1)")
    parser.add_argument("--kernel", default="auto", choices=("auto", "vnni", "avx2", "portable"),
                        help="mer's kernel for both dtypes (default auto: the fastest this CPU runs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args(argv)


def run(arguments: argparse.Namespace) -> dict:
    if arguments.kernel != "auto":  # swiglu_expert runs matmul's "auto" kernel: make it this one
        import mer.quant.matmul as matmul_module

        if not matmul_module.is_kernel_available(arguments.kernel):
            raise SystemExit(f"the {arguments.kernel} kernel cannot run on this CPU")
        matmul_module.fastest_kernel = lambda: arguments.kernel
    payloads = {"mxfp4": make_payloads("mxfp4")[0], "q4_0": make_payloads("q4_0")[1]}  # mxfp4 native, q4_0 planar
    ggml = {dtype: ggml_factory(dtype, make_payloads(dtype)[0].data)[0] for dtype in payloads}
    rows = []
    for batch in (int(value) for value in arguments.batches.split(",")):
        x = np.random.default_rng(batch).standard_normal((batch, D_MODEL)).astype(np.float32)
        methods = {f"mer {dtype}": (lambda payload=payload: swiglu_expert(payload, x, threads=arguments.threads))
                   for dtype, payload in payloads.items()}
        experts = {dtype: factory(batch) for dtype, factory in ggml.items() if factory is not None}
        for dtype, expert in experts.items():
            methods[f"ggml {dtype}"] = lambda expert=expert: expert.compute(x, arguments.threads)
        log(f"batch {batch}: {', '.join(methods)}")
        for method, milliseconds in time_interleaved(methods, arguments.repeats).items():
            nbytes = payloads[method.split()[1]].format.payload_nbytes
            rows.append({"method": method, "batch": batch, "ms": milliseconds, "ns_per_byte": milliseconds * 1e6 / nbytes})
        for expert in experts.values():
            expert.close()
    per_byte = {(row["method"], row["batch"]): row["ns_per_byte"] for row in rows}
    for row in rows:
        engine, dtype = row["method"].split()
        baseline = per_byte.get((f"{engine} q4_0", row["batch"]))
        row["per_byte_vs_q4_0"] = row["ns_per_byte"] / baseline if baseline else None
    kernel = fastest_kernel() if arguments.kernel == "auto" else arguments.kernel
    return {"kernel": kernel, "threads": arguments.threads, "repeats": arguments.repeats, "results": rows}


def main(argv: list[str] | None = None) -> int:
    report = run(parse_arguments(argv))
    if "--json" in (argv or sys.argv[1:]):
        print(json.dumps(report, indent=2))
        return 0
    print(f"Mixtral-shaped expert, kernel {report['kernel']}, {report['threads']} thread(s), "
          f"median of {report['repeats']} interleaved runs")
    print(f"{'method':<12}{'batch':>6}{'ms':>10}{'ns/byte':>9}{'per byte vs q4_0':>18}")
    for row in report["results"]:
        ratio = f"{row['per_byte_vs_q4_0']:.2f}x" if row["per_byte_vs_q4_0"] is not None else "-"
        print(f"{row['method']:<12}{row['batch']:>6}{row['ms']:>10.2f}{row['ns_per_byte']:>9.3f}{ratio:>18}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
