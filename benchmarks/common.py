"""Shared helpers for vitkit's benchmarks: machine report, matmul peak, alternating timing, tables.

The machines we measure on are shared and noisy, so every benchmark follows BENCHMARKS.md: all
contenders in one process on the same inputs, warmed up, timed round-robin (each repeat times every
contender once, in a rotating order), and summarised by medians and ratios, next to the fraction of
the matmul peak measured in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """What a result depends on: CPU (or GPU), cores, SIMD level, torch version, threads."""
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_case(
    dtype: torch.dtype, n: int, device: torch.device | str = "cpu"
) -> tuple[Callable[[], object], float]:
    """A call of an (n x n) @ (n x n)^T matmul in `dtype`, and its FLOPs (2 n^3).

    It goes through `F.linear`, the op a transformer's layers call: on some CPUs `a @ b` and
    `F.linear` reach different kernels for bf16 (oneDNN vs a slow fallback).
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: F.linear(a, b)), 2.0 * n**3


def matmul_size(
    dtype: torch.dtype,
    *,
    n: int = 2048,
    calls: int = 6,
    max_seconds: float = 10.0,
    device: torch.device | str = "cpu",
) -> int:
    """The largest n <= `n` (halving) whose matmul runs `calls` times within `max_seconds`.

    Where the dtype has no fast kernel (bf16 without AVX-512-BF16/AMX runs ~100x slower than
    fp32) a full-size peak measurement would take minutes; a probe at n/4 decides.
    """
    probe = n // 4
    fn, _ = matmul_case(dtype, probe, device)
    probe_s = min(time_calls(fn, repeats=2, warmup=1, device=device))
    while n > probe and probe_s * (n / probe) ** 3 * calls > max_seconds:
        n //= 2
    return n


def matmul_peak(
    dtype: torch.dtype,
    *,
    n: int | None = None,
    repeats: int = 5,
    device: torch.device | str = "cpu",
) -> float:
    """FLOP/s of a large square matmul in `dtype`: the median of `repeats` timed calls.

    This is the practical limit a transformer forward (mostly matmuls) can reach on this machine,
    in this dtype, with this thread count. `n=None` picks the size with `matmul_size`.
    """
    fn, flops = matmul_case(dtype, n or matmul_size(dtype, device=device), device)
    return flops / statistics.median(time_calls(fn, repeats=repeats, warmup=1, device=device))


def time_calls(
    fn: Callable[[], object], *, repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> list[float]:
    """Seconds per call of `fn`, `repeats` times after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def round_robin(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Time every contender once per repeat, rotating who goes first; seconds per call each.

    Alternating spreads the machine's slow and fast moments evenly over the contenders, so the
    ratio of their medians holds even when the absolute times drift (other jobs, frequency).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; numbers right-aligned, everything as given (format first)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return text in ("", "-")
    return True
