"""structlog configured once per process: JSON lines to a file or stderr, with process identity bound.

Event names are stable snake_case (`expert_read`, `token_done`, `run_summary`, ...).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO

import structlog

LOG_SCHEMA_VERSION = 1


def add_monotonic_time(logger, method_name, event_dict):
    """`t_mono`: CLOCK_MONOTONIC seconds, one clock for every process of the host, to order events."""
    event_dict["t_mono"] = time.monotonic()
    return event_dict


def configure_logging(process: str, *, stream: IO[str] | None = None, level: str = "info", **bound) -> None:
    """Route structlog events of this process as JSON lines to `stream` (stderr by default)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt=None, utc=True, key="ts"),
            add_monotonic_time,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(process=process, pid=os.getpid(), schema=LOG_SCHEMA_VERSION, **bound)


def get_logger(**initial):
    return structlog.get_logger(**initial)
