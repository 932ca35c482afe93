"""Every figure of the tiny model's card (`docs/tiny-model.md`) in one command, measured with mer itself.

    python tools/tiny_model_card.py [--model mer/models/tiny-moe-q8_0.gguf] [--training-log train.log
        --png docs/tiny-model-curve.png] [--json] [--trace routing.jsonl] [--no-llama]

On `--windows` fixed windows of `--length` tokens of the held-out files (`tools/tiny_moe_data.py`):
- held-out bits per byte (`tools/held_out_scoring.py`): the whole-window measure (mer's forward pass,
  every next-token prediction of each window, q8_0 as shipped) against a unigram model of the tokens of the
  training files; and llama-perplexity's scoring (BOS first, the second half of each window scored)
  by mer (`mer.model.perplexity`) and by llama.cpp (llama-cpp-python) on the same ids, with their
  relative difference;
- routing (from the whole-window passes, written as mer's JSONL trace): each layer's expert-usage
  entropy in bits (uniform over 8 experts: 3), and the mutual information between the input token and
  the experts chosen (0: routing ignores the token);
- next-layer gate accuracy per target layer (`tools/gate_accuracy.py`): mer's gate predictor on each
  token's residual at layer L against its routing at L+1, top-k and top-1, for the gate's ranking alone
  (gate_min_ratio 0) and as generation prefetches (the configured gate_min_ratio);
- ten fixed completions (`tools/header_completions.py`): the fraction of ten function and class
  headers whose completion up to the first dedent parses as Python, sampled (temperature 0.7, seed 0)
  and greedy, with the texts; with `--seeds N` also the sampled fraction over seeds 0..N-1 and the
  bodies' mean length in lines, parsing and failing;
- with `--training-log` (the text tools/train_tiny_moe.py printed): the training curve's points, and
  with `--png` its plot (`tools/training_curve.py`).

Prints the figures (or with `--json` one JSON object on stdout) and the seconds each part took.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools run as scripts

from gate_accuracy import RecordedPass, gate_accuracy, recorded_pass  # noqa: E402
from header_completions import (  # noqa: E402
    HEADERS, MAX_TOKENS, SEED, complete_all, complete_with_seeds, over_seeds_figures, over_seeds_line,
    parse_fraction)
from held_out_scoring import (  # noqa: E402
    llama_second_half, mer_second_half, score_of, token_byte_counts, whole_window_nlls)
from tiny_moe_data import held_out_windows, split_files, unigram_log2_probabilities  # noqa: E402
from training_curve import TrainingLogError, plot_training_curve, read_training_log  # noqa: E402

from mer.config import PipelineConfig  # noqa: E402
from mer.model.experts import GGUFExperts  # noqa: E402
from mer.model.model import MoEModel  # noqa: E402
from mer.model.tokenizer import load_tokenizer  # noqa: E402
from mer.predict.gate import GateWeights  # noqa: E402
from mer.routing.space import RoutingDecision  # noqa: E402
from mer.routing.trace import TraceHeader, TraceWriter, read_trace  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "mer" / "models" / "tiny-moe-q8_0.gguf"


def window_bits(model: MoEModel, window: np.ndarray, trace: TraceWriter | None = None,
                first_token: int = 0) -> np.ndarray:
    """Bits of each next-token prediction in `window`; the routing goes to `trace` when given."""
    recorded = recorded_pass(model, window)
    if trace is not None:
        record_routing(trace, recorded, first_token)
    return whole_window_nlls(recorded.logits, window) / np.log(2)


def record_routing(trace: TraceWriter, recorded: RecordedPass, first_token: int) -> None:
    """Write every token's decisions (all MoE layers, in order) of one recorded pass to `trace`."""
    layers = sorted(recorded.experts)
    for position in range(recorded.experts[layers[0]].shape[0]):
        for layer in layers:
            trace.write(RoutingDecision(first_token + position, layer, tuple(recorded.experts[layer][position].tolist()),
                                        tuple(recorded.weights[layer][position].tolist())))


def _entropy_bits(counts: np.ndarray) -> float:
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log2(shares)).sum())


def expert_usage_entropy(trace_path: Path) -> list[float]:
    """Per layer, the entropy in bits of how often each expert was chosen in the trace."""
    header, decisions = read_trace(trace_path)
    counts = np.zeros((header.layers, header.experts_per_layer))
    for decision in decisions:
        counts[decision.layer, list(decision.experts)] += 1
    return [_entropy_bits(row) for row in counts]


def expert_token_information(trace_path: Path, token_ids: np.ndarray) -> list[float]:
    """Per layer, the mutual information in bits between the input token id (`token_ids[decision.token]`)
    and the experts chosen: H(expert) - H(expert | token). 0 when routing ignores the token."""
    header, decisions = read_trace(trace_path)
    counts = np.zeros((header.layers, int(token_ids.max()) + 1, header.experts_per_layer))
    for decision in decisions:
        counts[decision.layer, token_ids[decision.token], list(decision.experts)] += 1
    information = []
    for layer_counts in counts:
        total = layer_counts.sum()
        conditional = sum(row.sum() / total * _entropy_bits(row) for row in layer_counts if row.sum())
        information.append(_entropy_bits(layer_counts.sum(axis=0)) - conditional)
    return information


class Timer:
    """Seconds per named part of the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def part(self, name: str, since: float) -> None:
        self.seconds[name] = round(time.perf_counter() - since, 2)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def held_out_figures(model: MoEModel, model_path: Path, windows: np.ndarray, trace_path: Path, *, llama: bool,
                     unigram_every: int, timer: Timer) -> tuple[dict, list[RecordedPass]]:
    """Both scorings' bits per byte, the unigram baseline and the routing figures; the recorded passes."""
    started = time.perf_counter()
    byte_counts = token_byte_counts(load_tokenizer(model.source.parts[0]))
    length = windows.shape[1]
    header = TraceHeader(len(model.moe_layers), model.hparams.num_experts, model.hparams.top_k)
    passes, nlls = [], []
    experts = GGUFExperts(model.source)
    with TraceWriter(trace_path, header) as trace:
        for index, window in enumerate(windows):
            passes.append(recorded_pass(model, window, experts))
            record_routing(trace, passes[-1], index * length)
            nlls.append(whole_window_nlls(passes[-1].logits, window))
    whole = score_of(np.concatenate(nlls), windows[:, 1:].reshape(-1), byte_counts)
    timer.part("whole_windows_mer", started)
    started = time.perf_counter()
    unigram = unigram_log2_probabilities(split_files()[0][::unigram_every])
    unigram_bits = float(-unigram[windows[:, 1:]].sum() / byte_counts[windows[:, 1:]].sum())
    timer.part("unigram", started)
    started = time.perf_counter()
    mer_half = mer_second_half(model, windows)
    timer.part("second_half_mer", started)
    figures = {"windows": len(windows), "length": length,
               "whole_window": {"mer": whole.to_json_dict(), "unigram_bits_per_byte": unigram_bits},
               "second_half": {"mer": mer_half.to_json_dict()}}
    if llama:
        started = time.perf_counter()
        llama_half = llama_second_half(model_path, windows, byte_counts)
        timer.part("second_half_llama_cpp", started)
        figures["second_half"]["llama_cpp"] = llama_half.to_json_dict()
        figures["second_half"]["relative_difference"] = mer_half.bits_per_byte / llama_half.bits_per_byte - 1
    started = time.perf_counter()
    figures["routing"] = {"expert_usage_entropy_bits": expert_usage_entropy(trace_path),
                          "token_expert_information_bits": expert_token_information(trace_path, windows.reshape(-1)),
                          # the estimator's bias on this many tokens: the same with the token ids shuffled
                          "token_expert_information_shuffled_bits": expert_token_information(
                              trace_path, np.random.default_rng(0).permutation(windows.reshape(-1)))}
    timer.part("routing", started)
    return figures, passes


def gate_figures(model_path: Path, passes: list[RecordedPass], timer: Timer) -> dict:
    started = time.perf_counter()
    weights = GateWeights.load(model_path)
    configured = PipelineConfig().gate_min_ratio
    figures = {"ranking": [layer.to_json_dict() for layer in gate_accuracy(weights, passes, min_ratio=0.0)],
               "configured_min_ratio": configured,
               "as_prefetched": [layer.to_json_dict() for layer in gate_accuracy(weights, passes, min_ratio=configured)]}
    timer.part("gate_accuracy", started)
    return figures


def completion_figures(model: MoEModel, headers: tuple[str, ...], max_tokens: int, seeds: int,
                       timer: Timer) -> dict:
    started = time.perf_counter()
    completions = complete_all(model, headers, max_tokens)
    figures = {"max_tokens": max_tokens,
               **{f"{kind}_parse_fraction": parse_fraction(items) for kind, items in completions.items()},
               **{kind: [item.to_json_dict() for item in items] for kind, items in completions.items()}}
    if seeds > 1:
        more = complete_with_seeds(model, range(SEED + 1, SEED + seeds), headers, max_tokens)
        figures["over_seeds"] = over_seeds_figures({SEED: completions["sampled"], **more})
    timer.part("completions", started)
    return figures


def curve_figures(log: Path, png: Path | None) -> dict:
    curve = read_training_log(log)
    if png is not None:
        plot_training_curve(curve, png)
    last = max(curve.held_out.items(), default=(None, None))
    return {"log": str(log), "png": None if png is None else str(png), "points": len(curve.train),
            "held_out_points": len(curve.held_out), "last_held_out_step": last[0],
            "last_held_out_bits_per_byte": last[1], **curve.to_json_dict()}


def measure(args: argparse.Namespace, trace_path: Path) -> dict:
    timer = Timer()
    started = time.perf_counter()
    model = MoEModel.load(args.model)
    if args.length > model.hparams.context_length:
        raise SystemExit(f"tiny_model_card: --length {args.length} is longer than {args.model}'s context of "
                         f"{model.hparams.context_length} tokens")
    windows = held_out_windows(args.windows, args.length)
    timer.part("load", started)
    card: dict = {"model": str(args.model)}
    if args.training_log is not None:
        card["training_curve"] = curve_figures(args.training_log, args.png)
    card["held_out"], passes = held_out_figures(model, args.model, windows, trace_path, llama=args.llama,
                                                unigram_every=args.unigram_every, timer=timer)
    card["gate"] = gate_figures(args.model, passes, timer)
    if args.completions:
        card["completions"] = completion_figures(model, HEADERS[: args.completions], args.max_tokens, args.seeds,
                                                 timer)
    card["seconds"] = {**timer.seconds, "total": timer.total()}
    return card


def _per_layer(values: list[float]) -> str:
    return " ".join(f"{value:.3f}" for value in values)


def _gate_line(layers: list[dict]) -> str:
    return ", ".join(f"layer {layer['layer']} {layer['topk_accuracy_pct']:.1f}/{layer['top1_accuracy_pct']:.1f}%"
                     for layer in layers)


def print_card(card: dict) -> None:
    held = card["held_out"]
    whole, half = held["whole_window"], held["second_half"]
    where = f"{held['windows']} held-out windows of {held['length']}"
    if "training_curve" in card:
        curve = card["training_curve"]
        print(f"training curve: {curve['points']} training points, {curve['held_out_points']} held-out points"
              + (f", last held-out {curve['last_held_out_bits_per_byte']:.3f} bits/byte at step "
                 f"{curve['last_held_out_step']}" if curve["held_out_points"] else "")
              + (f"; plot: {curve['png']}" if curve["png"] else ""))
    print(f"held-out, whole windows (mer): {whole['mer']['bits_per_byte']:.3f} bits/byte, unigram "
          f"{whole['unigram_bits_per_byte']:.3f} ({where})")
    line = f"held-out, second halves as llama-perplexity scores: mer {half['mer']['bits_per_byte']:.4f} bits/byte"
    if "llama_cpp" in half:
        line += (f", llama.cpp {half['llama_cpp']['bits_per_byte']:.4f} (relative difference "
                 f"{half['relative_difference']:.1e})")
    print(f"{line} ({half['mer']['tokens']} tokens scored, {half['mer']['bytes']} bytes)")
    print("expert-usage entropy per layer (bits):", _per_layer(held["routing"]["expert_usage_entropy_bits"]))
    print("information between token and experts per layer (bits):",
          _per_layer(held["routing"]["token_expert_information_bits"]), "; token ids shuffled (estimator bias):",
          _per_layer(held["routing"]["token_expert_information_shuffled_bits"]))
    gate = card["gate"]
    print(f"next-layer gate accuracy, top-k/top-1 per target layer: ranking {_gate_line(gate['ranking'])}; "
          f"as prefetched (gate_min_ratio {gate['configured_min_ratio']:g}) {_gate_line(gate['as_prefetched'])}")
    if "completions" in card:
        completions = card["completions"]
        for kind in ("sampled", "greedy"):
            items = completions[kind]
            print(f"completions {kind}: {sum(item['parses'] for item in items)}/{len(items)} parse "
                  f"(up to the first dedent, at most {completions['max_tokens']} tokens)")
            for item in items:
                print(f"--- {kind}, {'parses' if item['parses'] else 'does not parse'}"
                      f"{'' if item['dedent_found'] else ' (no dedent)'}:\n{item['source']}")
        if "over_seeds" in completions:
            print(over_seeds_line(completions["over_seeds"]))
    print("seconds:", ", ".join(f"{name} {value:.1f}" for name, value in card["seconds"].items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--training-log", type=Path, default=None, help="the text tools/train_tiny_moe.py printed")
    parser.add_argument("--png", type=Path, default=None, help="write the training curve here (needs --training-log)")
    parser.add_argument("--trace", type=Path, default=None, help="keep the held-out routing trace (JSONL) here")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--completions", type=int, default=len(HEADERS), choices=range(len(HEADERS) + 1),
                        metavar=f"0..{len(HEADERS)}", help="how many of the fixed headers to complete")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="also sample the completions with seeds 1..N-1 and give the fraction over all N "
                             "(default 1: seed 0 only, the card's goal figure)")
    parser.add_argument("--no-llama", dest="llama", action="store_false", help="skip llama.cpp's scoring")
    parser.add_argument("--unigram-every", type=int, default=1, metavar="N",
                        help="the unigram baseline from every Nth training file (default 1: all; 10 is ~10x faster)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.png is not None and args.training_log is None:
        parser.error("--png needs --training-log (the curve is read from the training log)")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: need at least 1 (seed 0)")
    if args.windows < 1 or args.length < 4 or args.max_tokens < 1:
        parser.error(f"--windows {args.windows}, --length {args.length}, --max-tokens {args.max_tokens}: need at "
                     f"least 1 window of at least 4 tokens (llama-perplexity scores its second half) and 1 token")
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    try:
        with tempfile.TemporaryDirectory(prefix="tiny-model-card-") as directory:
            card = measure(args, args.trace or Path(directory) / "routing.jsonl")
    except TrainingLogError as error:
        raise SystemExit(f"tiny_model_card: {error}") from None
    if args.json:
        print(json.dumps(card))
    else:
        print_card(card)


if __name__ == "__main__":
    main()
