"""What the router's link to one remote shard group carried and how long its answers took (`RemoteShards`):
logged per shard as `shard_link_summary` when a job ends, and served as `mer_shard_*_total` metrics by
`serve --cluster` (docs/events.md, docs/scale-out.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ShardLinkStats:
    """One shard's counters: requests answered, rows computed, bytes each way (array payloads), round trips
    (send to answer, microseconds), the shard's own compute time, failovers away from it and error replies."""

    shard: int
    endpoint: str
    requests: int = 0
    rows: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trip_us_total: float = 0.0
    round_trip_us_min: float = 0.0
    round_trip_us_max: float = 0.0
    shard_compute_us_total: float = 0.0
    failovers: int = 0
    errors: int = 0
    down: bool = False

    def add_answer(self, rows: int, sent: int, received: int, round_trip_us: float, compute_us: float) -> None:
        self.round_trip_us_min = round_trip_us if not self.requests else min(self.round_trip_us_min, round_trip_us)
        self.round_trip_us_max = max(self.round_trip_us_max, round_trip_us)
        self.requests += 1
        self.rows += rows
        self.bytes_sent += sent
        self.bytes_received += received
        self.round_trip_us_total += round_trip_us
        self.shard_compute_us_total += compute_us

    @property
    def round_trip_us_mean(self) -> float:
        return self.round_trip_us_total / self.requests if self.requests else 0.0

    def to_event_fields(self) -> dict:
        fields = asdict(self)
        fields["round_trip_us_mean"] = self.round_trip_us_mean
        return fields
