"""Hit rate against cache size, one line per policy (and predictor), drawn with matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mer.errors import ConfigError


def plot_hit_rates(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Draw each (policy, predictor)'s hit rate against cache slots into a PNG at `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    path = Path(path)
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        lines.setdefault((row["policy"], row["predictor"]), []).append((row["cache_slots"], row["hit_rate_pct"]))
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    try:
        for (policy, predictor), points in lines.items():
            points.sort()
            label = policy if predictor == "none" else f"{policy} + {predictor} prefetch"
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                      linestyle="-" if predictor == "none" else "--")
        axes.set_xlabel("cache slots")
        axes.set_ylabel("hit rate (%)")
        axes.set_title(title)
        axes.set_ylim(0, 100)
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        try:
            figure.savefig(path, format="png", dpi=100)
        except OSError as error:
            raise ConfigError(f"--plot {path}: cannot write the plot ({error.strerror or error})") from error
    finally:
        pyplot.close(figure)
    return path
