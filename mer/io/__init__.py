"""Expert read backends of the I/O worker: io_uring (O_DIRECT) and a thread-pool preadv fallback.

    reader = open_reader("auto", files, arena_data_view, queue_depth=4)
    result = await reader.submit(file_index, offset, nbytes, slot_view, priority="foreground")
    await reader.close()

The uring backend lives in `mer.io.uring_reader` (imported only when chosen).
"""

from mer.io.backend import READER_KINDS, ReaderKind, open_reader, probe_io_uring, probe_o_direct
from mer.io.preadv_reader import PreadvReader
from mer.io.read_request import PRIORITIES, Priority, ReadResult
from mer.io.reader_base import ExpertReader

Reader = ExpertReader

__all__ = [
    "PRIORITIES",
    "READER_KINDS",
    "ExpertReader",
    "PreadvReader",
    "Priority",
    "ReadResult",
    "Reader",
    "ReaderKind",
    "open_reader",
    "probe_io_uring",
    "probe_o_direct",
]
