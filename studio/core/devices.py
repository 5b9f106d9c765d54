"""Where the studio runs and in which precision: CUDA, MPS or CPU, fp32 / fp16 / bf16.

>>> device, dtype = pick_device_dtype("cpu")
>>> str(device), dtype
('cpu', torch.float32)
"""

from __future__ import annotations

import torch

from studio.core.errors import StudioError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def pick_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: CUDA (bf16 where supported, else fp16), MPS (fp16), CPU (fp32).

    Explicit choices are checked: a device that is not there, bf16 on a GPU without it, or fp16 on the
    CPU (many CPU kernels lack fp16 and the rest are slow) raise a StudioError.
    """
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StudioError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudioError("CUDA was requested but no CUDA GPU is available; use --device cpu.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise StudioError("MPS was requested but is not available on this machine; use --device cpu.")
    if dtype is None:
        if dev.type == "cuda":
            return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dev, torch.float16 if dev.type == "mps" else torch.float32
    dt = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(str(dtype).lower())
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise StudioError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16.")
    if dev.type == "cpu" and dt == torch.float16:
        raise StudioError(
            "fp16 on the CPU is very slow and some operations are unsupported; use fp32 (or bf16)."
        )
    if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise StudioError("this GPU does not support bf16; use fp16 or fp32.")
    return dev, dt
