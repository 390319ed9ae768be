"""Peak FLOP/s of the device a benchmark runs on, so every benchmark can print the fraction of peak its
useful work reaches (issue 33). One place for the GPU table and the CPU arithmetic.

CPU: cores the process may use (capped by torch's thread count) x clock x FLOP per core per cycle, where a
core is assumed to have 2 FMA units of the widest vector it has (AVX-512: 16 float32 lanes, AVX2: 8,
else 4), 2 FLOP per lane per FMA; bf16 doubles that on CPUs with AVX512-BF16 or AMX. The clock is the
largest `cpu MHz` in /proc/cpuinfo (or cpufreq's maximum where the kernel exposes it). Cores that split a
512-bit FMA into two 256-bit halves (AMD Zen 4) reach half of this figure; pass `--peak-tflops` to use a
vendor's number instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense bf16 peak of common accelerators (TFLOP/s).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


@dataclass(frozen=True)
class Peak:
    """A device's peak in FLOP/s for one dtype, and how it was arrived at (printed beside the fraction)."""

    flops: float | None
    how: str

    def fraction(self, flops: float) -> str:
        """`flops` as a share of the peak, for a printed line."""
        if not self.flops:
            return f"{flops / 1e9:.1f} GFLOP/s useful (peak unknown: pass --peak-tflops)"
        return f"{flops / 1e9:.1f} GFLOP/s useful = {100 * flops / self.flops:.1f}% of {self.how}"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[set[str], float | None]:
    """(CPU feature flags, clock in Hz) read from /proc/cpuinfo; (empty, None) where it is not there."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set(), None
    flags: set[str] = set()
    mhz: list[float] = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
    clock = max(mhz) * 1e6 if mhz else None
    cpufreq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        clock = max(clock or 0.0, int(cpufreq.read_text()) * 1e3) or clock
    except (OSError, ValueError):
        pass
    return flags, clock


def cpu_cores() -> int:
    """Cores this process may run on, capped by torch's thread count (the cores a benchmark's work uses)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(1, min(available, torch.get_num_threads()))


def cpu_peak(bf16: bool = False, cpuinfo: str | Path = "/proc/cpuinfo") -> Peak:
    """The CPU's peak FLOP/s in float32 (or bf16) from its cores, clock and vector width."""
    flags, clock = cpu_flags(cpuinfo)
    if clock is None:
        return Peak(None, "CPU peak (clock unknown)")
    lanes, isa = (16, "AVX-512") if "avx512f" in flags else (8, "AVX2") if "avx2" in flags else (4, "SSE")
    per_cycle = 2 * lanes * 2  # 2 FMA units x float32 lanes x 2 FLOP
    kind = "float32"
    if bf16:
        if not ({"avx512_bf16", "amx_bf16"} & flags):
            return Peak(None, "bf16 peak (no native bf16 on this CPU)")
        per_cycle, kind = per_cycle * 2, "bf16"
    cores = cpu_cores()
    flops = cores * clock * per_cycle
    arithmetic = f"{cores} cores x {clock / 1e9:.2f} GHz x {per_cycle} FLOP/cycle, {isa}"
    how = f"{kind} peak {flops / 1e9:.0f} GFLOP/s ({arithmetic})"
    return Peak(flops, how)


def gpu_peak(name: str) -> Peak:
    """Dense bf16 peak of a known accelerator, by name."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return Peak(value * 1e12, f"{name} bf16 peak {value:.0f} TFLOP/s")
    return Peak(None, f"{name} (not in the peak table)")


def device_peak(device: torch.device, bf16: bool, peak_tflops: float | None = None) -> Peak:
    """The peak to compare against: `peak_tflops` when given, else the GPU table or the CPU arithmetic."""
    if peak_tflops:
        return Peak(peak_tflops * 1e12, f"the given peak {peak_tflops:g} TFLOP/s")
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    return cpu_peak(bf16)
