"""Build the CUDA sources in kernels/cuda/ for the GPU in use, once, and launch them on torch's
current stream.

Each source is built once per element type (bf16, fp16, fp32: `-DSLORA_BF16` ...) and per GPU
architecture. With nvcc on the PATH (or under $CUDA_PATH) we build a cubin with
`-arch=sm_<major><minor>` read off the device (sm_90a on Hopper, for wgmma) and keep it in
$SLORA_KERNEL_CACHE (default ~/.cache/slora/kernels), named by a hash of the sources, the
options and nvcc's version; the cubin is loaded with cupy.RawModule. Without nvcc, CuPy's
NVRTC builds the same source (it targets the current device's architecture itself, without the
`a` features, and keeps its own cache). Either way a process builds a module at most once:
loaded modules and their kernels are kept here, per device.

Kernels launch on torch's current stream (`cupy.cuda.Stream.from_external`), so they order
with torch's work and are captured by `torch.cuda.graph` with the rest of a decode step.

`launch(..., pdl=True)` launches with programmatic dependent launch (Hopper and later): the
kernel may start while the one before it on the stream still runs, and waits for it where it
says so (`pdl_wait()` in common.cuh). CuPy's launch has no launch attributes, so this one goes
through the driver's cuLaunchKernelEx (ctypes). SLORA_PDL=0 turns it off; older GPUs and
drivers launch plainly.

`python -m slora.kernels.cuda_compile` builds every module for the current GPU in parallel
(and prints ptxas's register and shared-memory report): run it once before timing anything.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cupy
import numpy as np
import torch

SOURCE_DIR = Path(__file__).parent / "cuda"
SOURCES = ("lora_mbgmv.cu", "lora_mbgmm.cu", "attention.cu", "layer_ops.cu")
DTYPE_DEFINES = {
    torch.bfloat16: "SLORA_BF16",
    torch.float16: "SLORA_FP16",
    torch.float32: "SLORA_FP32",
}
NVCC_OPTIONS = ("-O3", "-std=c++17")

_lock = threading.Lock()
_modules: dict[tuple[int, str, str], cupy.RawModule] = {}
_kernels: dict[tuple[int, str, str, str], cupy.RawKernel] = {}
_streams: dict[int, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("SLORA_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "slora" / "kernels"


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_PATH", ""), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def device_arch(device_index: int) -> str:
    """nvcc's -arch for the device: sm_90a on Hopper (its warpgroup MMA, wgmma, is an
    architecture-specific feature: a cubin built so runs on sm_90 only, the GPU in use)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _source_text(source: str) -> str:
    return (SOURCE_DIR / "common.cuh").read_text() + (SOURCE_DIR / source).read_text()


_nvcc_version_cache: dict[str, str] = {}


def _nvcc_version(nvcc: str) -> str:
    if nvcc not in _nvcc_version_cache:
        _nvcc_version_cache[nvcc] = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return _nvcc_version_cache[nvcc]


def build_cubin(source: str, define: str, arch: str, nvcc: str) -> Path:
    """The cubin of `source` for one element type and architecture, built if not cached."""
    options = (*NVCC_OPTIONS, f"-arch={arch}", f"-D{define}")
    key = hashlib.sha256("\0".join(
        (_nvcc_version(nvcc), " ".join(options), _source_text(source))).encode()).hexdigest()
    out = cache_dir() / f"{Path(source).stem}-{define}-{arch}-{key[:20]}.cubin"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = [nvcc, "-cubin", *options, f"-I{SOURCE_DIR}", "-Xptxas", "-v",
           "-o", str(tmp), str(SOURCE_DIR / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} ({define}, {arch}):\n{proc.stderr}")
    out.with_suffix(".log").write_text(proc.stderr)
    os.replace(tmp, out)
    return out


def _load_module(device_index: int, source: str, define: str) -> cupy.RawModule:
    nvcc = find_nvcc()
    with cupy.cuda.Device(device_index):
        if nvcc is not None:
            cubin = build_cubin(source, define, device_arch(device_index), nvcc)
            return cupy.RawModule(path=str(cubin))
        # NVRTC: CuPy adds -arch=sm_XX for the current device itself.
        code = _source_text(source).replace('#include "common.cuh"', "")
        return cupy.RawModule(code=code, options=("-std=c++17", f"-D{define}"))


def get_kernel(source: str, dtype: torch.dtype, name: str, device_index: int) -> cupy.RawKernel:
    """Kernel `name` of `source` built for `dtype`, loaded on device `device_index`."""
    key = (device_index, source, str(dtype), name)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        mkey = (device_index, source, DTYPE_DEFINES[dtype])
        module = _modules.get(mkey)
        if module is None:
            module = _load_module(device_index, source, DTYPE_DEFINES[dtype])
            _modules[mkey] = module
        with cupy.cuda.Device(device_index):
            kernel = module.get_function(name)
        _kernels[key] = kernel
    return kernel


def current_stream(device_index: int):
    """torch's current stream on the device, as a CuPy stream (cached by handle)."""
    ts = torch.cuda.current_stream(device_index)
    handle = ts.cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        try:
            stream = cupy.cuda.Stream.from_external(ts)
        except (AttributeError, TypeError, ValueError):
            stream = cupy.cuda.ExternalStream(handle, device_index)
        _streams[handle] = stream
    return stream


def launch(kernel: cupy.RawKernel, grid: tuple, block: tuple, args: tuple, device_index: int,
           shared_mem: int = 0, pdl: bool = False) -> None:
    if pdl and pdl_available(device_index):
        _launch_programmatic(kernel, grid, block, args, device_index, shared_mem)
        return
    with cupy.cuda.Device(device_index), current_stream(device_index):
        kernel(grid, block, args, shared_mem=shared_mem)


# ---- programmatic dependent launch through the driver API --------------------------------

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, pad to 8, 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_ARG_TYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
              np.float32: ctypes.c_float}
_launch_ex = None
_pdl_devices: dict[int, bool] = {}


def _driver_launch_ex():
    """cuLaunchKernelEx from the driver library, or None where it has none."""
    global _launch_ex
    if _launch_ex is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
        except (OSError, AttributeError):
            fn = False
        else:
            fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                           ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
            fn.restype = ctypes.c_int
        _launch_ex = fn
    return _launch_ex or None


def pdl_available(device_index: int) -> bool:
    """Whether launch(..., pdl=True) launches programmatically on this device."""
    ok = _pdl_devices.get(device_index)
    if ok is None:
        ok = (os.environ.get("SLORA_PDL", "1") != "0"
              and torch.cuda.get_device_capability(device_index)[0] >= 9
              and _driver_launch_ex() is not None)
        _pdl_devices[device_index] = ok
    return ok


def _launch_programmatic(kernel, grid, block, args, device_index, shared_mem) -> None:
    values = [_ARG_TYPES[type(a)](a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    grid3, block3 = (*grid, 1, 1)[:3], (*block, 1, 1)[:3]
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), shared_mem,
                           torch.cuda.current_stream(device_index).cuda_stream,
                           ctypes.pointer(attr), 1)
    with cupy.cuda.Device(device_index):
        err = _launch_ex(ctypes.byref(config), kernel.kernel.ptr, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err} "
                           f"(SLORA_PDL=0 launches without programmatic dependence)")


_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_smem_opt_in: dict[int, int] = {}  # id(kernel) -> the size it is allowed


def allow_dynamic_smem(kernel: cupy.RawKernel, nbytes: int, device_index: int) -> None:
    """Lets `kernel` launch with `nbytes` of dynamic shared memory (past the default 48 KB
    a kernel must opt in: cuFuncSetAttribute through ctypes). The attribute is one value
    per kernel, so it only ever grows: setting a smaller size after a larger one would make
    the next launch with the larger size fail."""
    if _smem_opt_in.get(id(kernel), 0) >= nbytes:
        return
    fn = ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    with cupy.cuda.Device(device_index):
        err = fn(kernel.kernel.ptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
    if err:
        raise RuntimeError(f"cuFuncSetAttribute(max dynamic shared memory {nbytes}) failed "
                           f"with CUresult {err}")
    _smem_opt_in[id(kernel)] = nbytes


# Kernel arguments, converted explicitly: a pointer is passed as a 64-bit integer.
def ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def i32(n: int) -> np.int32:
    return np.int32(n)


def i64(n: int) -> np.int64:
    return np.int64(n)


def f32(x: float) -> np.float32:
    return np.float32(x)


NULL = np.uint64(0)
"""A null pointer argument."""


def prebuild(device_index: int = 0,
             dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list[Path]:
    """Build every module for the device's architecture in parallel (nvcc only)."""
    nvcc = find_nvcc()
    if nvcc is None:
        return []
    arch = device_arch(device_index)
    jobs = [(s, DTYPE_DEFINES[d]) for s in SOURCES for d in dtypes]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: build_cubin(job[0], job[1], arch, nvcc), jobs))


if __name__ == "__main__":
    paths = prebuild(torch.cuda.current_device())
    if not paths:
        print("nvcc not found: kernels will be built by NVRTC at first use")
    for p in paths:
        print(p)
        if "-v" in sys.argv:
            print(p.with_suffix(".log").read_text())
