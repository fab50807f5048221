"""What this machine has: free RAM and NVIDIA GPUs, found without importing torch.

Importing a CUDA build of torch costs about half a gigabyte of resident memory and seconds of
start-up, so the question "is there a GPU?" is answered from the driver: no driver, no GPU, and
torch is never imported. With a driver, `nvidia-smi` reports each GPU's free memory; torch is the
fallback only where the driver exists and nvidia-smi does not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Gpu:
    """One CUDA device and its memory in bytes."""

    index: int
    name: str
    total: int
    free: int


@dataclass(frozen=True)
class Hardware:
    """The memory a model may use on this machine."""

    ram_total: int
    ram_free: int
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return values


def _cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2, then v1): the OOM killer acts on it, not on MemTotal."""
    for path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            try:
                used = int(Path(usage_path).read_text().strip())
            except (OSError, ValueError):
                used = 0
            return max(int(raw) - used, 0)
    return None


def ram() -> tuple[int, int]:
    """(total, available) bytes of RAM, bounded by a container's memory limit."""
    info = _meminfo()
    if "MemTotal" in info:
        total = info["MemTotal"]
        free = info.get("MemAvailable", info.get("MemFree", total))
    else:  # macOS and other systems without /proc
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            free = total
    limit = _cgroup_limit()
    if limit is not None:
        free = min(free, limit)
    return total, free


def has_nvidia_driver() -> bool:
    """Whether an NVIDIA driver is loaded: the cheap test that keeps torch out of CPU-only machines."""
    return NVIDIA_DRIVER.exists() or shutil.which("nvidia-smi") is not None


def _gpus_from_smi() -> tuple[Gpu, ...] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus: list[Gpu] = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]
    for line in out.strip().splitlines():
        index, name, total, free = (p.strip() for p in line.split(","))
        if wanted is not None and index not in wanted:
            continue
        mib = 1 << 20
        # Renumber as CUDA will see them once CUDA_VISIBLE_DEVICES applies.
        gpus.append(Gpu(len(gpus), name, int(float(total)) * mib, int(float(free)) * mib))
    return tuple(gpus)


def _gpus_from_torch() -> tuple[Gpu, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    gpus: list[Gpu] = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(Gpu(i, torch.cuda.get_device_name(i), int(total), int(free)))
    return tuple(gpus)


def gpus() -> tuple[Gpu, ...]:
    """The CUDA devices and their free memory; () without touching torch when there is no driver."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not has_nvidia_driver():
        return ()
    found = _gpus_from_smi()
    return found if found is not None else _gpus_from_torch()


def detect(want_gpus: bool = True) -> Hardware:
    """RAM and (unless want_gpus is False, as with --device cpu) the GPUs of this machine."""
    total, free = ram()
    return Hardware(ram_total=total, ram_free=free, gpus=gpus() if want_gpus else ())


_cache: tuple[float, Hardware] | None = None
_cache_lock = threading.Lock()  # /status runs on many threads; one nvidia-smi call at a time is plenty


def detect_cached(max_age: float = 2.0) -> Hardware:
    """detect(), reused for `max_age` seconds: /status may be polled, nvidia-smi takes tens of ms."""
    global _cache
    with _cache_lock:
        now = time.monotonic()
        if _cache is None or now - _cache[0] > max_age:
            _cache = (now, detect())
        return _cache[1]
