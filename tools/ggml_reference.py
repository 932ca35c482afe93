"""ggml's own CPU kernels driven through ctypes, as a reference for tools/bench_kernels.py.

llama-cpp-python ships libggml-base.so and libggml-cpu.so but no Python bindings for them, so
this module declares the few C functions and structs it needs (from the headers installed with
the package) and builds the SwiGLU expert graph

    out = mul_mat(down, swiglu_split(mul_mat(gate, x), mul_mat(up, x)))

on tensors whose `data` points straight at numpy buffers: ggml computes on the very bytes mer
computes on (native GGUF layout), with its usual rounding of the activations (q8_0 for q4_0 /
q8_0 weights, Q8_K for K-quants).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

GGML_TYPES = {"f32": 0, "q4_0": 2, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14, "mxfp4": 39}
_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * _MAX_DIMS),
        ("nb", ctypes.c_size_t * _MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * _MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * _MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _ComputePlan(ctypes.Structure):
    _fields_ = [
        ("work_size", ctypes.c_size_t),
        ("work_data", ctypes.c_void_p),
        ("n_threads", ctypes.c_int),
        ("threadpool", ctypes.c_void_p),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("use_ref", ctypes.c_bool),
    ]


_TensorPointer = ctypes.POINTER(_Tensor)


def _load_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    import llama_cpp  # noqa: F401  (only to find its directory; raises ImportError when absent)

    library_dir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(library_dir / "libggml-base.so"), mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(library_dir / "libggml-cpu.so"), mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
    base.ggml_init.argtypes, base.ggml_init.restype = [_InitParams], ctypes.c_void_p
    base.ggml_free.argtypes = [ctypes.c_void_p]
    base.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_new_tensor_2d.restype = _TensorPointer
    for name in ("ggml_mul_mat", "ggml_swiglu_split"):
        function = getattr(base, name)
        function.argtypes = [ctypes.c_void_p, _TensorPointer, _TensorPointer]
        function.restype = _TensorPointer
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [ctypes.c_void_p], ctypes.c_void_p
    base.ggml_build_forward_expand.argtypes = [ctypes.c_void_p, _TensorPointer]
    cpu.ggml_cpu_init.argtypes = []
    cpu.ggml_graph_plan.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    cpu.ggml_graph_plan.restype = _ComputePlan
    cpu.ggml_graph_compute.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ComputePlan)]
    cpu.ggml_graph_compute.restype = ctypes.c_int
    cpu.ggml_cpu_init()
    return base, cpu


class GgmlExpert:
    """The SwiGLU expert of one native payload as a ggml graph, for batches of `batch` tokens.

    `payload` (uint8, gate ‖ up ‖ down, all of `dtype`, or of the three dtypes of a tuple such
    as ("q4_k", "q4_k", "q6_k")) and the input buffer are used in place; call
    `compute(x, threads)` to run it.
    """

    def __init__(self, payload: np.ndarray, d_model: int, d_ff: int, dtype: str | tuple[str, str, str], batch: int):
        self._base, self._cpu = _load_libraries()
        self.batch, self.d_model, self.d_ff = batch, d_model, d_ff
        self._payload = payload
        self._input = np.zeros((batch, d_model), dtype=np.float32)
        self._tensor_context = self._base.ggml_init(_InitParams(16 * 1024 * 1024, None, True))
        compute_bytes = 4 * batch * (3 * d_ff + d_model) + 16 * 1024 * 1024
        self._compute_context = self._base.ggml_init(_InitParams(compute_bytes, None, False))
        self._dtypes = (dtype,) * 3 if isinstance(dtype, str) else tuple(dtype)
        self._graph, self._output = self._build()
        self._work = np.empty(0, dtype=np.uint8)

    def _weight(self, type_id: int, columns: int, rows: int, offset: int) -> _TensorPointer:
        tensor = self._base.ggml_new_tensor_2d(self._tensor_context, type_id, columns, rows)
        tensor.contents.data = self._payload.ctypes.data + offset
        return tensor

    def _build(self) -> tuple[int, _TensorPointer]:
        from mer.compute.dtypes import dtype_by_name

        d_model, d_ff = self.d_model, self.d_ff
        shapes = ((d_model, d_ff), (d_model, d_ff), (d_ff, d_model))  # (columns, rows) = (ne0, ne1)
        matrices, offset = [], 0
        for dtype, (columns, rows) in zip(self._dtypes, shapes):
            matrices.append(self._weight(GGML_TYPES[dtype], columns, rows, offset))
            offset += rows * dtype_by_name(dtype).row_nbytes(columns)
        if offset != self._payload.size:
            raise ValueError(f"payload of {self._payload.size} bytes, the {self._dtypes} expert needs {offset}")
        gate, up, down = matrices
        x = self._base.ggml_new_tensor_2d(self._tensor_context, GGML_TYPES["f32"], d_model, self.batch)
        x.contents.data = self._input.ctypes.data
        context = self._compute_context
        hidden = self._base.ggml_swiglu_split(
            context, self._base.ggml_mul_mat(context, gate, x), self._base.ggml_mul_mat(context, up, x)
        )
        output = self._base.ggml_mul_mat(context, down, hidden)
        graph = self._base.ggml_new_graph(context)
        self._base.ggml_build_forward_expand(graph, output)
        return graph, output

    def compute(self, x: np.ndarray, threads: int) -> np.ndarray:
        """The expert's output for `x` (float32, `[batch, d_model]`) on `threads` threads."""
        self._input[:] = x
        plan = self._cpu.ggml_graph_plan(self._graph, threads, None)
        if plan.work_size > self._work.size:
            self._work = np.empty(plan.work_size, dtype=np.uint8)
        plan.work_data = self._work.ctypes.data
        status = self._cpu.ggml_graph_compute(self._graph, ctypes.byref(plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        data = ctypes.cast(self._output.contents.data, ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(data, shape=(self.batch, self.d_model)).copy()

    def close(self) -> None:
        self._base.ggml_free(self._compute_context)
        self._base.ggml_free(self._tensor_context)
