"""The router's job interface: what runs through the graph once every child is ready.

The start message's type picks the job (`mer.router.service`): `StartBenchmark` runs `BenchJob`,
`StartGeneration` runs `GenerateJob`, `StartServing` runs `ServeJob` (serving's continuous batching) and
`StartPerplexity` runs `PerplexityJob` (`mer-pipeline perplexity`) and `StartShardGroup` runs `ShardJob`
(`mer-pipeline shard-serve`: the graph serves its experts to a remote router). A job runs to its end
and returns its typed summary, which the router sends to the supervisor in `JobDone`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from mer.config import PipelineConfig
from mer.predict.fusion import GATE
from mer.metrics.summary import JobSummary


class Job(ABC):
    """One job of the router."""

    @abstractmethod
    async def run(self) -> JobSummary:
        """Run the job through the graph; its summary (also logged by the job)."""

    async def close(self) -> None:
        """Release what the job holds beyond the graph's clients (the router calls it however the job ended)."""


def sends_hidden(config: PipelineConfig) -> bool:
    """Whether a job sends each decision's residual to the predictor (`HiddenObserved`): the gate
    predictor is on, with prefetch."""
    return config.prefetch and GATE in config.predictors
