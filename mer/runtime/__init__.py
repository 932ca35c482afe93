"""Names and lifetimes of a run on the machine: run ids, runtime directory, endpoints (`paths`),
supervisor liveness (`liveness`) and removal of what dead runs left behind (`cleanup`)."""

from mer.runtime.liveness import is_process_alive, process_start_time
from mer.runtime.paths import (
    SupervisorRecord,
    arena_path,
    check_run_id,
    create_runtime_dir,
    endpoint,
    new_run_id,
    process_name,
    read_supervisor_record,
    remove_runtime_dir,
    runtime_base_dir,
    runtime_dir,
    shm_prefix,
)

__all__ = [
    "SupervisorRecord",
    "arena_path",
    "check_run_id",
    "create_runtime_dir",
    "endpoint",
    "is_process_alive",
    "new_run_id",
    "process_name",
    "process_start_time",
    "read_supervisor_record",
    "remove_runtime_dir",
    "runtime_base_dir",
    "runtime_dir",
    "shm_prefix",
]
