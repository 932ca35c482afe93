"""`--cluster ADDRESS`: which Ray cluster the shard groups are placed on (docs/scale-out.md).

    auto              join the Ray cluster already running on this machine (`ray start --head`)
    local:N           start a throw-away local Ray cluster of N nodes on this machine (tests, trying it)
    HOST:PORT         join the cluster whose head (its GCS) listens there
    ray://HOST:PORT   join through Ray Client (needs `ray[client]`)

Every malformed value is a `ConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mer.errors import ConfigError

MAX_LOCAL_NODES = 8  # a local cluster is for one machine: each node costs ~300 MB of Ray processes
FORMS = "auto, local:N (1 <= N <= 8), HOST:PORT or ray://HOST:PORT"


@dataclass(frozen=True)
class ClusterAddress:
    """A parsed `--cluster` value. `kind` is `auto`, `local` (with `num_local_nodes`) or `join`
    (with `ray_address`, what `ray.init(address=...)` takes)."""

    text: str
    kind: Literal["auto", "local", "join"]
    num_local_nodes: int = 0
    ray_address: str = ""

    @property
    def is_ray_client(self) -> bool:
        return self.ray_address.startswith("ray://")


def parse_cluster_address(text: str) -> ClusterAddress:
    value = text.strip()
    if value == "auto":
        return ClusterAddress(text, "auto", ray_address="auto")
    if value.startswith("local:"):
        return ClusterAddress(text, "local", num_local_nodes=_local_node_count(text, value[len("local:"):]))
    host_port = value[len("ray://"):] if value.startswith("ray://") else value
    _check_host_port(text, host_port)
    return ClusterAddress(text, "join", ray_address=value)


def _local_node_count(text: str, count: str) -> int:
    if not count.isdigit() or not 1 <= int(count) <= MAX_LOCAL_NODES:
        raise ConfigError(f"--cluster {text!r}: the node count of local:N must be an integer from 1 to "
                          f"{MAX_LOCAL_NODES}, not {count!r}")
    return int(count)


def _check_host_port(text: str, host_port: str) -> None:
    host, separator, port = host_port.rpartition(":")
    if not separator or not host or "/" in host_port or " " in host_port:
        raise ConfigError(f"--cluster {text!r} is not an address; the forms are {FORMS}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--cluster {text!r}: port {port!r} is not an integer from 1 to 65535")
