"""What a benchmark ran on: the CPU model, AMX or not, torch threads, and the full command."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def _python() -> str:
    """The interpreter as the user would type it: relative to the working folder when inside it."""
    exe = Path(sys.executable)
    try:
        return str(exe.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def machine(workers: int) -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor() or "?")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "amx": "amx_tile" in info,
        "torch": torch.__version__,
        "torch_threads": 1 if workers > 1 else torch.get_num_threads(),
        "workers": workers,
        "command": " ".join(shlex.quote(a) for a in [_python(), *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def describe(m: dict) -> str:
    return (f"{m['cpu']} ({m['cores']} cores, AMX {'yes' if m['amx'] else 'no'}), torch {m['torch']}, "
            f"{m['workers']} worker(s) x {m['torch_threads']} torch thread(s)")


def seconds_per_image(net, n: int = 20) -> float:
    """Wall seconds per image of an Inception feature pass, measured on ``n`` random 32x32 images."""
    x = torch.rand(n, 1, 32, 32) * 2 - 1
    net(x[:2])  # warm-up (TorchScript optimises on the first calls)
    t = time.perf_counter()
    net(x)
    return (time.perf_counter() - t) / n
