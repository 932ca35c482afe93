"""The figures of `tools/bench_beyond_ram.py`: routing spread, paired ratios, the table, the plot.

- `routing_usage`: per MoE layer, how often each expert was routed to in mer's decode passes, from
  its `--log-file` (the I/O worker's `acquire_done` events: `expert_ids` are global ids
  `layer * experts + e`; a decode pass's `token` is a position >= the prompt length).
  `concentration_problems` says which layers are far from even (normalized entropy of the usage
  below `MIN_LAYER_ENTROPY`, or below `MIN_MEAN_ENTROPY` on average): a cache then holds what is
  used and no figure about streaming can be trusted.
- `block_figures`: from the same log's `moe_block_done` events, the median dense and expert time of
  a decode block (the dense-residency goal compares the first across budgets) and the hit rates of
  decode and prefill separately.
- `pair_ratios`: in an ABBA round (A B1 B2 .. B2 B1 A), each variant's run in the first half is
  paired with the llama.cpp run of the first half and likewise for the second half; a round's
  ratio is the geometric mean of its two, the spread is min..max over every half.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

MIN_LAYER_ENTROPY = 0.6  # normalized (1.0: every expert used equally)
MIN_MEAN_ENTROPY = 0.8
GB = 1e9
# mer's own figures per run, the table's second part: dense and expert ms per decode block, hit
# rates of decode and prefill, and the bytes its processes read (their read_bytes) over mer's count
MER_BLOCK_KEYS = ("dense_ms_per_block", "expert_ms_per_block", "decode_hit_rate_pct", "prefill_hit_rate_pct",
                  "counted_vs_mer_bytes")


def events_named(log_file: Path, name: str) -> Iterator[dict]:
    """The events called `name` of a JSON-lines log, in order (lines of other events are not parsed)."""
    marker = f'"{name}"'
    with open(log_file) as lines:
        for line in lines:
            if marker in line:
                event = json.loads(line)
                if event.get("event") == name:
                    yield event


def routing_usage(log_file: Path, prompt_length: int, experts_per_layer: int) -> dict[int, list[int]]:
    """{moe_layer: [count per expert]} over the decode passes of one generation's log."""
    usage: dict[int, list[int]] = {}
    for event in events_named(log_file, "acquire_done"):
        if int(event["token"]) < prompt_length:
            continue
        for expert_id in event["expert_ids"]:
            layer, expert = divmod(int(expert_id), experts_per_layer)
            usage.setdefault(layer, [0] * experts_per_layer)[expert] += 1
    return dict(sorted(usage.items()))


def acquire_steps(log_file: Path) -> list[tuple[int, tuple[int, ...]]]:
    """Every `acquire_done` of one generation's log in order: (token, global expert ids) per request."""
    return [(int(event["token"]), tuple(int(e) for e in event["expert_ids"]))
            for event in events_named(log_file, "acquire_done")]


def block_figures(log_file: Path) -> dict:
    """Per MoE block of one generation's log (`moe_block_done`): the median `dense_us` and `expert_us`
    of the decode blocks (a block of one token) in ms, and the hit rates (% of expert lookups) of
    decode and of prefill (blocks of more than one token), each None where the log has no such block."""
    dense, expert, hits = [], [], {"decode": [0, 0], "prefill": [0, 0]}
    for event in events_named(log_file, "moe_block_done"):
        phase = "decode" if int(event.get("tokens", 1)) == 1 else "prefill"
        if phase == "decode":
            dense.append(float(event["dense_us"]))
            expert.append(float(event["expert_us"]))
        hits[phase][0] += int(event["hits"])
        hits[phase][1] += int(event["hits"]) + int(event["misses"])
    return {"dense_ms_per_block": statistics.median(dense) / 1e3 if dense else None,
            "expert_ms_per_block": statistics.median(expert) / 1e3 if expert else None,
            **{f"{phase}_hit_rate_pct": 100.0 * found / total if total else None
               for phase, (found, total) in hits.items()}}


def belady_misses(steps: Sequence[tuple[int, tuple[int, ...]]], slots: int, from_token: int) -> int:
    """Misses of Belady's MIN (the optimal demand-fetch cache, knowing the whole request sequence) with
    `slots` slots on `steps`, counted over the steps of tokens >= `from_token` (the decode passes; the
    prompt's steps warm the cache). A step's experts are resident together: none evicts another."""
    if slots < max((len(set(ids)) for _, ids in steps), default=0):
        raise ValueError(f"{slots} slots cannot hold one request's experts")
    uses: dict[int, list[int]] = {}
    for index, (_, ids) in enumerate(steps):
        for expert in set(ids):
            uses.setdefault(expert, []).append(index)
    cursor = {expert: 0 for expert in uses}  # index into uses[expert] of its next use at or after the step
    resident: set[int] = set()
    misses = 0
    for index, (token, ids) in enumerate(steps):
        wanted = set(ids)
        for expert in wanted:
            cursor[expert] += 1  # past this use
        for expert in sorted(wanted - resident):
            if token >= from_token:
                misses += 1
            if len(resident) >= slots:
                def next_use(candidate: int) -> int:
                    position = cursor[candidate]
                    return uses[candidate][position] if position < len(uses[candidate]) else len(steps)
                victim = max(sorted(resident - wanted), key=next_use)
                resident.remove(victim)
            resident.add(expert)
    return misses


def normalized_entropy(counts: Sequence[int]) -> float:
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return 0.0
    entropy = -sum(c / total * math.log(c / total) for c in counts if c)
    return entropy / math.log(len(counts))


def concentration_problems(usage: dict[int, list[int]]) -> list[str]:
    """Why the routing is too concentrated to trust (empty: spread enough)."""
    if not usage:
        return ["no decode routing found in the log (acquire_done events)"]
    entropies = {layer: normalized_entropy(counts) for layer, counts in usage.items()}
    problems = [f"layer {layer}: usage {usage[layer]} (normalized entropy {value:.2f} < {MIN_LAYER_ENTROPY})"
                for layer, value in entropies.items() if value < MIN_LAYER_ENTROPY]
    mean = statistics.fmean(entropies.values())
    if mean < MIN_MEAN_ENTROPY:
        problems.append(f"mean normalized entropy over layers {mean:.2f} < {MIN_MEAN_ENTROPY}")
    return problems


def usage_summary(usage: dict[int, list[int]]) -> dict:
    entropies = [normalized_entropy(counts) for counts in usage.values()]
    return {"layers": len(usage), "min_entropy": min(entropies, default=0.0),
            "mean_entropy": statistics.fmean(entropies) if entropies else 0.0,
            "experts_used_min": min((sum(1 for c in counts if c) for counts in usage.values()), default=0)}


def abba_order(engines: Sequence[str]) -> list[str]:
    """One round: llama.cpp first, the variants, then the same backwards (A B C C B A)."""
    return [*engines, *reversed(engines)]


def pair_ratios(runs: Sequence[dict], reference: str, engine: str, key: str) -> list[tuple[int, float]]:
    """(round, engine/reference ratio of `key`) for each half of each ABBA round."""
    ratios = []
    for round_index in sorted({run["round"] for run in runs}):
        in_round = [run for run in runs if run["round"] == round_index and run.get("ok")]
        for half in (0, 1):
            mine = [run.get(key) for run in in_round if run["engine"] == engine and run["half"] == half]
            theirs = [run.get(key) for run in in_round if run["engine"] == reference and run["half"] == half]
            if mine and theirs and mine[0] is not None and theirs[0]:
                ratios.append((round_index, mine[0] / theirs[0]))
    return ratios


def geometric_mean(values: Iterable[float]) -> float:
    values = [value for value in values if value > 0]
    return math.exp(statistics.fmean(math.log(value) for value in values)) if values else float("nan")


def summarize(runs: Sequence[dict], engines: Sequence[str], reference: str) -> list[dict]:
    """One row per engine: medians over its runs and, for the variants, ratios to the reference."""
    rows = []
    for engine in engines:
        mine = [run for run in runs if run["engine"] == engine and run.get("ok")]
        row = {"engine": engine, "runs": len(mine), "failed": sum(1 for run in runs if run["engine"] == engine
                                                                   and not run.get("ok"))}
        for key in ("decode_tps", "prefill_tps", "decode_gb_per_token", "belady_gb_per_token", "peak_gib",
                    "hit_rate_pct", "startup_s", *MER_BLOCK_KEYS):
            values = [run[key] for run in mine if run.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_range"] = (min(values), max(values)) if values else None
        if engine != reference:
            for key in ("decode_tps", "prefill_tps", "decode_gb_per_token"):
                ratios = pair_ratios(runs, reference, engine, key)
                per_round = {}
                for round_index, ratio in ratios:
                    per_round.setdefault(round_index, []).append(ratio)
                row[f"{key}_ratio"] = {
                    "per_round": [geometric_mean(values) for _, values in sorted(per_round.items())],
                    "median": statistics.median(ratio for _, ratio in ratios) if ratios else None,
                    "spread": (min(r for _, r in ratios), max(r for _, r in ratios)) if ratios else None,
                }
        rows.append(row)
    return rows


def _range(value: tuple[float, float] | None, digits: int) -> str:
    if value is None:
        return "-"
    low, high = value
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"


def _ratio(entry: dict | None) -> str:
    if not entry or entry["median"] is None:
        return "-"
    rounds = ", ".join(f"{value:.2f}x" for value in entry["per_round"])
    return f"{entry['median']:.2f}x ({_range(entry['spread'], 2)}; rounds {rounds})"


def format_table(budget_label: str, rows: Sequence[dict]) -> str:
    lines = [f"### budget {budget_label}", "",
             "| engine | runs | decode tok/s | decode vs llama.cpp | prefill tok/s | prefill vs llama.cpp "
             "| GB read per decode token | bytes vs llama.cpp | Belady GB per token | peak GiB | hit rate % "
             "| start-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['engine']} | {row['runs']}{' (+' + str(row['failed']) + ' failed)' if row['failed'] else ''} "
            f"| {_range(row['decode_tps_range'], 3)} | {_ratio(row.get('decode_tps_ratio'))} "
            f"| {_range(row['prefill_tps_range'], 2)} | {_ratio(row.get('prefill_tps_ratio'))} "
            f"| {_range(row['decode_gb_per_token_range'], 2)} | {_ratio(row.get('decode_gb_per_token_ratio'))} "
            f"| {_range(row['belady_gb_per_token_range'], 2)} "
            f"| {_range(row['peak_gib_range'], 2)} | {_range(row['hit_rate_pct_range'], 1)} "
            f"| {_range(row['startup_s_range'], 1)} |")
    mer_rows = [row for row in rows if row.get("dense_ms_per_block_range")]
    if mer_rows:
        lines += ["", "| engine | dense ms per decode block | expert ms per decode block | decode hit % "
                      "| prefill hit % | bytes its processes read / mer's count |", "|---|---|---|---|---|---|"]
        for row in mer_rows:
            lines.append(f"| {row['engine']} | {_range(row['dense_ms_per_block_range'], 1)} "
                         f"| {_range(row['expert_ms_per_block_range'], 1)} "
                         f"| {_range(row['decode_hit_rate_pct_range'], 1)} | {_range(row['prefill_hit_rate_pct_range'], 1)} "
                         f"| {_range(row['counted_vs_mer_bytes_range'], 3)} |")
    return "\n".join(lines)


def plot_curve(path: Path, curve: dict[str, list[tuple[float, float]]]) -> str:
    """Decode tok/s against budget (GiB) per engine, as a PNG; returns what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    figure, axes = plt.subplots(figsize=(6, 4))
    for engine, points in curve.items():
        points = sorted(points)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=engine)
    axes.set_xlabel("memory limit (GiB)")
    axes.set_ylabel("decode tokens/s (median)")
    axes.set_title("Mixtral-shaped q4_0 beyond RAM")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return f"plot written to {path}"
