"""What every child of a run needs to know, shipped as JSON when it is spawned (no pickle of objects)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RunSpec:
    """The identity and shared resources of one run of the process graph."""

    run_id: str
    runtime_dir: str
    arena_path: str
    num_slots: int
    slot_nbytes: int
    store: str
    supervisor_pid: int
    num_compute_workers: int
    config: dict[str, Any]
    model: str | None = None  # the GGUF of a generation job (the gate predictor reads its router gates); None: benchmark
    incarnation: int = 0  # processes that held this child's name before it (0: started with the graph; >0: a restart)

    def endpoint(self, name: str) -> str:
        """ipc endpoint of a socket of this run (`control`, `io`, `compute`, `observe`, `predictor_progress`)."""
        return f"ipc://{self.runtime_dir}/{name}.sock"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))
