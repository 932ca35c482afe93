"""Expert read backends of the I/O worker: io_uring (O_DIRECT) and a thread-pool preadv fallback.

    reader = open_reader("auto", files, arena_data_view, queue_depth=4)
    result = await reader.submit(file_index, offset, nbytes, slot_view, priority="foreground")
    await reader.close()

The uring backend lives in `mer.io.uring_reader` (imported only when chosen).
"""

from mer.io.backend import open_reader

__all__ = ["open_reader"]
