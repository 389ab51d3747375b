"""Reduced precision on tensors: which dtype, on which device, whether the hardware makes it fast, a loss
scaler only where it is needed, and FP8's number grid and scaling error (for teaching; no GPU needed).

Plain PyTorch only. References: Micikevicius et al., "Mixed Precision Training", ICLR 2018; Micikevicius
et al., "FP8 Formats for Deep Learning", arXiv 2209.05433 (E4M3 max 448, E5M2 max 57344).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "FP8_DTYPES",
    "autocast_dtype",
    "cpu_fast_bf16",
    "fp8_grid",
    "fp8_scaling_error",
    "make_grad_scaler",
    "precision_support",
]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16}
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def autocast_dtype(dtype) -> torch.dtype:
    """`torch.bfloat16`/`torch.float16` or their names ("bf16", "fp16", ...); anything else is an error."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be torch.bfloat16 or torch.float16 (or 'bf16' / 'fp16'), got {dtype!r}")


@lru_cache(maxsize=1)
def cpu_fast_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX or Arm BF16), and what was found.

    Without these instructions bf16 matmuls are emulated through fp32 and usually run slower than fp32.
    """
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private but exact; /proc/cpuinfo otherwise
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None and probe():
        return True, "AVX512-BF16"
    if amx is not None and amx():
        return True, "AMX"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"), ("bf16", "Arm BF16")):
        if flag in flags:
            return True, name
    capability = torch.backends.cpu.get_cpu_capability()
    return False, f"no AVX512-BF16, AMX or Arm BF16 (CPU capability {capability})"


def precision_support(device_type: str, dtype: torch.dtype) -> tuple[bool, str]:
    """(usable, note): whether autocast to `dtype` works on `device_type`, and what to expect of its speed.

    `usable=False` means it cannot run at all (an error); the note otherwise says whether it is fast."""
    if not torch.amp.is_autocast_available(device_type):
        return False, f"torch.autocast does not support device type {device_type!r}"
    if device_type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return False, ("this GPU has no bfloat16 (it needs compute capability >= 8.0, Ampere or newer): "
                           "use dtype='fp16' (with its loss scaler)")
        return True, f"{dtype} tensor cores on {torch.cuda.get_device_name()}"
    if device_type == "cpu":
        if dtype == torch.float16:
            return True, ("fp16 on a CPU is emulated and slow: it only shows fp16 numerics; "
                          "use dtype='bf16' for speed on CPUs with AVX512-BF16/AMX")
        fast, found = cpu_fast_bf16()
        if fast:
            return True, f"this CPU computes bf16 natively ({found})"
        return True, (f"this CPU lacks fast bf16 ({found}): bf16 autocast is emulated and usually slower than "
                      "fp32 here; it still halves the memory of saved activations")
    return True, f"{dtype} autocast on {device_type}"


def make_grad_scaler(device_type: str, dtype: torch.dtype, enabled: bool | None = None, **kwargs):
    """A `torch.amp.GradScaler` where one is needed (fp16 on CUDA: gradients would underflow fp16's range),
    else None (bf16 has fp32's range). `enabled=True` forces one (e.g. to study loss scaling on a CPU)."""
    if enabled is None:
        enabled = dtype == torch.float16 and device_type == "cuda"
    return torch.amp.GradScaler(device_type, **kwargs) if enabled else None


def fp8_grid(fmt: str = "e4m3") -> torch.Tensor:
    """Every finite value of an FP8 format ("e4m3": torch.float8_e4m3fn, "e5m2"), sorted, as float32.

    E4M3 has 3 mantissa bits and reaches ±448; E5M2 has 2 and reaches ±57344 (more range, less precision)."""
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt must be one of {sorted(FP8_DTYPES)}, got {fmt!r}")
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPES[fmt]).float()
    return values[torch.isfinite(values)].unique()  # unique() sorts and merges +0/-0


def fp8_scaling_error(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensorwise") -> dict:
    """Quantise `x` (2-D) to FP8 as FP8 training does: scale so that the largest magnitude (of the whole
    tensor, or of each row) lands on the format's maximum, cast, cast back, unscale. Returns the dequantised
    tensor, the scales and the relative error (median and max over non-zero entries, and the fraction of
    non-zero entries flushed to zero). One outlier row makes a tensorwise scale crush the other rows;
    rowwise scaling keeps them."""
    if granularity not in ("tensorwise", "rowwise"):
        raise ValueError(f"granularity must be 'tensorwise' or 'rowwise', got {granularity!r}")
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt must be one of {sorted(FP8_DTYPES)}, got {fmt!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D floating-point tensor, got shape {tuple(x.shape)} of {x.dtype}")
    dtype = FP8_DTYPES[fmt]
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True) if granularity == "rowwise" else x.abs().amax()
    scale = torch.finfo(dtype).max / amax.clamp_min(1e-12)
    dequantised = (x * scale).to(dtype).float() / scale
    nonzero = x != 0
    rel = ((dequantised - x).abs() / x.abs())[nonzero]
    flushed = ((dequantised == 0) & nonzero).sum() / nonzero.sum().clamp_min(1)
    return {"dequantised": dequantised, "scale": scale,
            "median_rel_error": float(rel.median()) if rel.numel() else math.nan,  # sync-ok: not a training step
            "max_rel_error": float(rel.max()) if rel.numel() else math.nan,  # sync-ok
            "flushed_fraction": float(flushed)}  # sync-ok
