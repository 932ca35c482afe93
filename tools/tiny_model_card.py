"""The numbers of the tiny model's card (`docs/tiny-model.md`), measured with mer itself (no torch).

    python tools/tiny_model_card.py [--model mer/models/tiny-moe-q8_0.gguf] [--trace routing.jsonl]

- held-out bits per byte of the GGUF (mer's forward pass, q8_0 as shipped) on fixed windows of the
  held-out files, and of a unigram byte model of the training files on the same windows;
- greedy samples (64 tokens, EOS ignored) and seeded sampled ones (192 tokens) for a few prompts;
- a routing trace (mer's JSONL trace format) of the held-out windows, read back to give each layer's
  expert-usage entropy in bits (uniform over 8 experts: 3 bits; one expert only: 0), and the mutual
  information between the input token and the experts chosen (0: routing ignores the token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.routing.space import RoutingDecision
from mer.routing.trace import TraceHeader, TraceWriter, read_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe_data import held_out_windows, split_files, unigram_log2_probabilities  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "mer" / "models" / "tiny-moe-q8_0.gguf"
PROMPTS = ("def ", "import ", "class ")


def window_bits(model: MoEModel, window: np.ndarray, trace: TraceWriter | None = None,
                first_token: int = 0) -> np.ndarray:
    """Bits of each next-token prediction in `window`; the routing goes to `trace` when given."""
    result = forward(model, window, model.new_kv_cache(len(window)), GGUFExperts(model.source))
    logits = result.logits[:-1].astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_normaliser = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    bits = (log_normaliser - logits[np.arange(len(window) - 1), window[1:]]) / np.log(2)
    if trace is not None:
        record_routing(trace, result.routings, first_token)
    return bits


def record_routing(trace: TraceWriter, routings: dict, first_token: int) -> None:
    """Write every token's decisions (all MoE layers, in order) of one forward pass to `trace`."""
    layers = sorted(routings)
    for position in range(routings[layers[0]].experts.shape[0]):
        for moe_layer, block in enumerate(layers):
            routing = routings[block]
            trace.write(RoutingDecision(first_token + position, moe_layer, tuple(routing.experts[position].tolist()),
                                        tuple(routing.weights[position].tolist())))


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


def sample_text(model: MoEModel, prompt: str, steps: int = 64, sampler: Sampler | None = None) -> str:
    """`prompt` and its continuation (greedy unless `sampler` is given; EOS ignored)."""
    tokenizer = load_tokenizer(model.source.parts[0])
    result = generate(model, tokenizer.encode(prompt), steps, sampler or Sampler(), GGUFExperts(model.source),
                      ignore_eos=True)
    return prompt + tokenizer.decode(result.tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--trace", type=Path, default=Path("tiny-model-routing.jsonl"))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    model = MoEModel.load(args.model)
    windows = held_out_windows(args.windows, args.length)
    unigram = unigram_log2_probabilities(split_files()[0])
    header = TraceHeader(len(model.moe_layers), model.hparams.num_experts, model.hparams.top_k)
    with TraceWriter(args.trace, header) as trace:
        bits = np.concatenate([window_bits(model, window, trace, index * args.length)
                               for index, window in enumerate(windows)])
    unigram_bits = float(-np.concatenate([unigram[window[1:]] for window in windows]).mean())
    print(f"held-out: model {bits.mean():.3f} bits/byte, unigram {unigram_bits:.3f} bits/byte "
          f"({args.windows} windows of {args.length})")
    entropies = expert_usage_entropy(args.trace)
    print("expert-usage entropy per layer (bits):", " ".join(f"{value:.3f}" for value in entropies))
    information = expert_token_information(args.trace, windows.reshape(-1))
    print("information between token and experts per layer (bits):", " ".join(f"{value:.3f}" for value in information))
    for prompt in PROMPTS:
        print(f"--- greedy from {prompt!r}:\n{sample_text(model, prompt)}")
    for prompt in PROMPTS:
        sampler = Sampler(temperature=0.7, top_p=0.95, seed=0)
        print(f"--- sampled (temperature 0.7, top-p 0.95, seed 0) from {prompt!r}:\n"
              f"{sample_text(model, prompt, 192, sampler)}")


if __name__ == "__main__":
    main()
