"""Reading a running server from outside: `/metrics` scraped into `{sample: value}` (prometheus_client's
parser), as `mer-pipeline top`, `tools/bench_serve.py` and the tests read it."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as `{name: value}`, labelled samples as `name{key=value,...}` (keys sorted)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """The server's `/metrics` now (`base_url`: `http://host:port`)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as response:
        return parse_metrics(response.read().decode())
