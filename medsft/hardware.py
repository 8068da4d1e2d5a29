"""What this machine's processor can do that the config's `auto` values depend on."""

from __future__ import annotations

import functools
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo) of native bf16 matrix units: Intel AMX, and AVX512-BF16 (Intel since Cooper
# Lake, AMD since Zen 4). With them, bf16 matmuls run 2-3x faster than fp32 (measured on this project's EPYC,
# AVX512-BF16 without AMX: 202 vs 88 GFLOP/s on one core, 375 vs 117 on two; benchmarks/throughput.py reports the
# machine's GEMM peaks), and the demo trains at 1.37x the fp32 tokens/s with the same losses (README).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native bf16 flags this CPU reports (empty where it has none, or where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)
