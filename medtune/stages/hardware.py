"""GPU check (the walkthrough's step 02): ``nvidia-smi`` and a per-device memory table with training headroom."""

from __future__ import annotations

import shutil
import subprocess

import psutil
import torch

GIB = 2**30


def nvidia_smi() -> str | None:
    """The output of ``nvidia-smi`` as the walkthrough shows it, or None when there is no NVIDIA driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run([exe], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_memory() -> tuple[float, float]:
    """(total, available) system memory in GiB (``psutil.virtual_memory``: on Linux /proc/meminfo's MemTotal and
    MemAvailable). Also preflight's memory check on a machine without a GPU."""
    vm = psutil.virtual_memory()
    return vm.total / GIB, vm.available / GIB


def memory_table(model_gib: float = 0.0) -> list[dict]:
    """Total, used and free memory per device, in GiB, and the headroom left once the model is loaded.

    Args:
        model_gib: memory the quantized model takes (from :func:`medtune.stages.modeling.quantization_report`) if it is
            not loaded in this process; 0 when it is already counted in "used".

    Returns:
        One dict per GPU (``torch.cuda.mem_get_info``), or one row for the CPU when no GPU is visible:
        ``{"device", "name", "total_gib", "used_gib", "free_gib", "headroom_gib"}``.
    """
    rows = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            share = model_gib / torch.cuda.device_count()
            rows.append({
                "device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                "total_gib": round(total / GIB, 2), "used_gib": round((total - free) / GIB, 2),
                "free_gib": round(free / GIB, 2), "headroom_gib": round(free / GIB - share, 2),
            })
    else:
        total, free = cpu_memory()
        rows.append({
            "device": "cpu", "name": "system memory (no GPU visible)", "total_gib": round(total, 2),
            "used_gib": round(total - free, 2), "free_gib": round(free, 2), "headroom_gib": round(free - model_gib, 2),
        })
    return rows


def show(rows: list[dict]) -> None:
    """Print :func:`memory_table` as a fixed-width table."""
    print(f"{'device':<8} {'name':<32} {'total GiB':>10} {'used GiB':>9} {'free GiB':>9} {'headroom GiB':>13}")
    for r in rows:
        print(f"{r['device']:<8} {r['name'][:32]:<32} {r['total_gib']:>10.2f} {r['used_gib']:>9.2f} "
              f"{r['free_gib']:>9.2f} {r['headroom_gib']:>13.2f}")
