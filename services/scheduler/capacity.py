"""How much VRAM there is to hand out: read from NVML when a GPU is present, else a virtual GPU from settings.

On a CPU machine the same lease protocol runs against the virtual GPU, so every test exercises real scheduling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from baton.runtime.logging import log_event

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class GpuCapacity:
    total_bytes: int
    source: str  # "nvml" or "settings"
    name: str


def detect_capacity(
    gpu_index: int, virtual_vram_gib: float, *, virtual_gpu: str = "rtx-pro-6000", use_nvml: bool = True
) -> GpuCapacity:
    """NVML's total memory of the GPU; else ``virtual_vram_gib``; else the memory of the planner's catalogue GPU
    ``virtual_gpu`` (an unknown name is an INVALID_ARGUMENT that lists the catalogue)."""
    if use_nvml:
        found = _nvml_capacity(gpu_index)
        if found is not None:
            return found
    if virtual_vram_gib > 0:
        capacity = GpuCapacity(int(virtual_vram_gib * GIB), "settings", f"virtual GPU ({virtual_vram_gib:g} GiB)")
    else:
        from baton.planner.catalog import gpu

        simulated = gpu(virtual_gpu)
        capacity = GpuCapacity(simulated.memory_bytes, "settings", f"virtual {simulated.name}")
    log_event(log, "gpu.virtual", capacity_bytes=capacity.total_bytes)
    return capacity


def _nvml_capacity(gpu_index: int) -> GpuCapacity | None:
    try:
        import pynvml  # nvidia-ml-py: a thin ctypes binding; it loads libnvidia-ml only here

        pynvml.nvmlInit()
    except Exception as error:  # no driver, no library: a CPU machine
        log_event(log, "gpu.nvml_unavailable", level=logging.DEBUG, error=str(error))
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as error:
        log_event(log, "gpu.nvml_error", level=logging.WARNING, gpu_index=gpu_index, error=str(error))
        return None
    finally:
        pynvml.nvmlShutdown()
    log_event(log, "gpu.detected", name=name, capacity_bytes=total, gpu_index=gpu_index)
    return GpuCapacity(total, "nvml", name)
