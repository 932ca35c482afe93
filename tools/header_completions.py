"""Ten fixed completions: does the model write a body that parses as Python after a function or class header?

For each header of `HEADERS` (stdlib-like `def` / `class` lines), the prompt is the header, a newline
and the body's indentation (`BODY_INDENT`, four spaces as in the standard library). The model
continues it (mer's `generate`, BOS first, at most `max_tokens` tokens, stopping at EOS) once sampled
(mer's `Sampler(temperature=0.7, seed=SEED)`, a fresh sampler per header so that each completion
depends only on its own header) and once greedily. The completion is cut at the first dedent: the
first non-blank line after the body's first statement line that does not start with that line's
indentation (the prompt's four spaces plus any the model added; `cut_at_dedent`); without one (the
token budget or EOS came first) the whole completion is kept, possibly ending mid-line. The header,
the indentation and the cut completion must then parse with `ast.parse` (`parses`). The figure is the
fraction that parse, sampled and greedy.
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer

HEADERS = (
    "def parse_args(argv):",
    "class Stack:",
    "def read_config(path, encoding='utf-8'):",
    "class Timer(object):",
    "def __init__(self, name, value=None):",
    "def is_valid_identifier(name):",
    "class ParseError(Exception):",
    "def copy_file(source, destination):",
    "def _format_size(size):",
    "class LRUCache(dict):",
)
BODY_INDENT = "    "
TEMPERATURE = 0.7
SEED = 0
MAX_TOKENS = 200


def prompt_of(header: str) -> str:
    """What the model continues: the header, a newline and the body's indentation."""
    return f"{header}\n{BODY_INDENT}"


def cut_at_dedent(completion: str, prompt_indent: str = BODY_INDENT) -> tuple[str, bool]:
    """`completion` (the text after the prompt, whose first line continues the prompt's indentation
    `prompt_indent`) up to the first dedent, and whether there was one. The body's indentation is that
    of its first non-blank line (the prompt's indentation and whatever whitespace the model added to
    it); the dedent is the first later non-blank line that does not start with that indentation (less
    indented, or indented differently)."""
    lines = (prompt_indent + completion).split("\n")
    first = next((index for index, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return completion, False
    body_indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    for index in range(first + 1, len(lines)):
        if lines[index].strip() and not lines[index].startswith(body_indent):
            return "\n".join(lines[:index])[len(prompt_indent):] + "\n", True
    return completion, False


def parses(source: str) -> bool:
    """Whether `source` is valid Python (`ast.parse`; a null byte counts as not parsing)."""
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Completion:
    """One header's completion: the model's text, the part kept (up to the dedent) and whether it parses."""

    header: str
    generated: str  # everything the model wrote after the prompt
    kept: str  # up to the first dedent
    dedent_found: bool
    tokens: int
    parses: bool

    @property
    def source(self) -> str:
        return prompt_of(self.header) + self.kept

    def to_json_dict(self) -> dict:
        return {"header": self.header, "source": self.source, "generated": self.generated,
                "dedent_found": self.dedent_found, "tokens": self.tokens, "parses": self.parses}


def judge(header: str, generated: str, tokens: int) -> Completion:
    """Cut `generated` at its first dedent and check that header + body parse."""
    kept, found = cut_at_dedent(generated)
    return Completion(header, generated, kept, found, tokens, parses(prompt_of(header) + kept))


def complete(model: MoEModel, header: str, sampler: Sampler, max_tokens: int = MAX_TOKENS) -> Completion:
    """The model's completion of `header`'s body (stops at EOS or after `max_tokens`), judged."""
    tokenizer = load_tokenizer(model.source.parts[0])
    result = generate(model, tokenizer.encode(prompt_of(header)), max_tokens, sampler, GGUFExperts(model.source))
    return judge(header, tokenizer.decode(result.tokens), len(result.tokens))


def sampled_sampler(seed: int = SEED) -> Sampler:
    return Sampler(temperature=TEMPERATURE, seed=seed)


def complete_all(model: MoEModel, headers: tuple[str, ...] = HEADERS,
                 max_tokens: int = MAX_TOKENS) -> dict[str, list[Completion]]:
    """Every header completed sampled (temperature 0.7, seed 0) and greedily."""
    return {"sampled": [complete(model, header, sampled_sampler(), max_tokens) for header in headers],
            "greedy": [complete(model, header, Sampler(), max_tokens) for header in headers]}


def complete_with_seeds(model: MoEModel, seeds: range, headers: tuple[str, ...] = HEADERS,
                        max_tokens: int = MAX_TOKENS) -> dict[int, list[Completion]]:
    """Every header completed sampled (temperature 0.7) once per seed of `seeds`: ten completions are a
    small sample (over seeds 0-4 the shipped model parsed 2-3 of 10, the first model 1-6), so the card
    also gives the fraction over several seeds."""
    return {seed: [complete(model, header, sampled_sampler(seed), max_tokens) for header in headers]
            for seed in seeds}


def body_lines(completion: Completion) -> int:
    """How many lines the kept body has (the prompt's indented line counts when the model continued it)."""
    return len([line for line in (BODY_INDENT + completion.kept).split("\n") if line.strip()])


def parse_fraction(completions: list[Completion]) -> float:
    return sum(completion.parses for completion in completions) / len(completions)


def over_seeds_figures(by_seed: dict[int, list[Completion]]) -> dict:
    """The sampled completions of several seeds together: how many parse, per seed and in all, and the
    mean length in lines of the bodies that parse and of those that do not."""
    every = [item for items in by_seed.values() for item in items]
    parsing, failing = [item for item in every if item.parses], [item for item in every if not item.parses]

    def mean_lines(items: list[Completion]) -> float | None:
        return float(np.mean([body_lines(item) for item in items])) if items else None

    return {"seeds": sorted(by_seed), "completions": len(every), "parse": len(parsing),
            "parse_fraction": parse_fraction(every),
            "parse_by_seed": [sum(item.parses for item in by_seed[seed]) for seed in sorted(by_seed)],
            "body_lines_mean_parsing": mean_lines(parsing), "body_lines_mean_failing": mean_lines(failing),
            "no_dedent": sum(not item.dedent_found for item in every)}


def over_seeds_line(figures: dict) -> str:
    def mean(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return (f"completions sampled over seeds {figures['seeds'][0]}..{figures['seeds'][-1]}: {figures['parse']}/"
            f"{figures['completions']} parse ({100 * figures['parse_fraction']:.0f}%; by seed "
            f"{' '.join(map(str, figures['parse_by_seed']))}); body lines, mean: "
            f"{mean(figures['body_lines_mean_parsing'])} parsing, {mean(figures['body_lines_mean_failing'])} "
            f"failing; {figures['no_dedent']} without a dedent")


def main(argv: list[str] | None = None) -> None:
    """The sampled completions alone, over seeds 0..N-1, for any model of the tiny family (the card's
    other figures need the shipped vocabulary; this works for the first model's byte vocabulary too)."""
    parser = argparse.ArgumentParser(description="Sampled header completions over several seeds: how many parse.")
    parser.add_argument("--model", type=Path,
                        default=Path(__file__).resolve().parent.parent / "mer" / "models" / "tiny-moe-q8_0.gguf")
    parser.add_argument("--seeds", type=int, default=5, metavar="N", help="seeds 0..N-1 (default 5)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--json", action="store_true", help="print one JSON object, the completions included")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.max_tokens < 1:
        parser.error(f"--seeds {args.seeds}, --max-tokens {args.max_tokens}: need at least 1 of each")
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    model = MoEModel.load(args.model)
    by_seed = complete_with_seeds(model, range(SEED, SEED + args.seeds), max_tokens=args.max_tokens)
    figures = over_seeds_figures(by_seed)
    if args.json:
        print(json.dumps({"model": str(args.model), "max_tokens": args.max_tokens, **figures,
                          "sampled": {str(seed): [item.to_json_dict() for item in items]
                                      for seed, items in by_seed.items()}}))
    else:
        print(f"{args.model}: {over_seeds_line(figures)}")


if __name__ == "__main__":
    main()
