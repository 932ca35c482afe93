"""The training curve of `tools/train_tiny_moe.py` from its printed log, and its PNG.

    python tools/training_curve.py train.log --png docs/tiny-model-curve.png

The log lines read (everything else, such as `model:`, is skipped):

    data: 1690 training files (30,017,042 tokens), 100 held out (1,511,878 tokens); unigram held-out 4.745 bits/byte
    step 25/7000 train 5.904 bits/byte, balance 1.194, busiest expert share ..., 43 s
    eval step 500: held-out 2.266 bits/byte (unigram 4.745)

A resumed run prints steps again: the last line printed for a step wins (the run that went on from
its checkpoint). A line that starts like one of these but does not parse is an error naming the file
and line. The PNG (matplotlib) has the training bits per byte (each point the mean of the last 25
steps' batches) and the held-out bits per byte against the step, the unigram baseline dashed.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

TRAIN_LINE = re.compile(r"step (\d+)/(\d+) train (\d+(?:\.\d+)?|nan|inf) bits/byte")
DATA_UNIGRAM = re.compile(r"data: .*unigram held-out (\d+(?:\.\d+)?) bits/byte")
EVAL_LINE = re.compile(r"eval step (\d+): held-out (\d+(?:\.\d+)?|nan|inf) bits/byte(?: \(unigram (\d+(?:\.\d+)?)\))?")


class TrainingLogError(ValueError):
    """A training log line that looks like a step line but does not parse, or a log without steps."""


@dataclass
class TrainingCurve:
    """Steps and bits per byte of a training log (sorted by step), its planned steps and unigram baseline."""

    train: dict[int, float] = field(default_factory=dict)
    held_out: dict[int, float] = field(default_factory=dict)
    total_steps: int | None = None
    unigram: float | None = None

    def to_json_dict(self) -> dict:
        return {"total_steps": self.total_steps, "unigram_bits_per_byte": self.unigram,
                "train": sorted(self.train.items()), "held_out": sorted(self.held_out.items())}


def parse_training_log(text: str, source: str = "the training log") -> TrainingCurve:
    """The curve of a `train_tiny_moe.py` log (see the module docstring)."""
    curve = TrainingCurve()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("data:") and (match := DATA_UNIGRAM.match(stripped)) is not None:
            curve.unigram = float(match[1])
        elif stripped.startswith("eval step"):
            match = EVAL_LINE.match(stripped)
            if match is None:
                raise TrainingLogError(f"{source}, line {number}: not an eval line ('eval step N: held-out X "
                                       f"bits/byte'): {stripped[:120]!r}")
            curve.held_out[int(match[1])] = float(match[2])
            if match[3] is not None:
                curve.unigram = float(match[3])
        elif stripped.startswith("step "):
            match = TRAIN_LINE.match(stripped)
            if match is None:
                raise TrainingLogError(f"{source}, line {number}: not a step line ('step N/M train X bits/byte'): "
                                       f"{stripped[:120]!r}")
            curve.train[int(match[1])] = float(match[3])
            curve.total_steps = int(match[2])
    if not curve.train and not curve.held_out:
        raise TrainingLogError(f"{source}: no 'step N/M train X bits/byte' or 'eval step N: held-out X bits/byte' "
                               f"line")
    curve.train = dict(sorted(curve.train.items()))
    curve.held_out = dict(sorted(curve.held_out.items()))
    return curve


def read_training_log(path: Path) -> TrainingCurve:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise TrainingLogError(f"{path}: cannot read the training log: {error}") from None
    return parse_training_log(text, str(path))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the training curve PNG needs matplotlib (a dependency of mer: pip install -e . or "
                         "pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_training_curve(curve: TrainingCurve, png: Path, title: str = "tiny MoE model") -> None:
    """Write the curve as a PNG (see the module docstring)."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.2), dpi=120)
    if curve.train:
        axes.plot(list(curve.train), list(curve.train.values()), color="#9ecae1", linewidth=1,
                  label="training batches (mean of 25 steps)")
    if curve.held_out:
        axes.plot(list(curve.held_out), list(curve.held_out.values()), "o-", color="#08519c", markersize=3,
                  label="held-out")
    if curve.unigram is not None:
        axes.axhline(curve.unigram, color="gray", linestyle="--", linewidth=1,
                     label=f"unigram model of the tokens ({curve.unigram:.2f})")
    axes.set_xlabel("step" + (f" (of {curve.total_steps})" if curve.total_steps else ""))
    axes.set_ylabel("bits per byte")
    axes.set_ylim(0, None)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path, help="the text tools/train_tiny_moe.py printed")
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        curve = read_training_log(args.log)
    except TrainingLogError as error:
        raise SystemExit(str(error)) from None
    plot_training_curve(curve, args.png)
    last = max(curve.held_out.items(), default=None)
    print(f"{args.png}: {len(curve.train)} training points, {len(curve.held_out)} held-out points"
          + (f", last held-out {last[1]:.3f} bits/byte at step {last[0]}" if last else ""))


if __name__ == "__main__":
    main()
