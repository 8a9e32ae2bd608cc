"""Where the heads compute and in what precision: the device, mixed precision, and the dtype rule of the float32 parts.

torch is imported inside the functions: ``mdmf-cache --help`` and the torch-free configs import nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mdmf_cache.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["available_devices", "resolve_device", "heads_autocast", "at_least_float32"]


def available_devices() -> list[str]:
    """The devices this machine has: ``cpu`` and ``cuda:0``, ``cuda:1``, ..."""
    import torch

    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` (the first GPU if there is one, else the CPU) or a device that exists here.

    Raises:
        ConfigError: an unknown device name, or a GPU this machine does not have (the devices that
            exist are named).
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {device!r} is not a device name; this machine has: {have}") from e
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: no such GPU here (CUDA available: {torch.cuda.is_available()}); "
                          f"this machine has: {have}")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported; this machine has: {have}")
    return dev


def heads_autocast(device: "torch.device"):
    """Mixed precision for the few-shot heads: bf16 autocast on CUDA, plain float32 on CPU.

    On CUDA, what stays float32 (OTAM's soft-min, the losses: the heads switch autocast off there)
    may use TF32 matmuls. On this project's CPUs bf16 runs 10-30x slower (no bf16 hardware), so CPU
    gets a no-op context.
    """
    import contextlib

    import torch

    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16)


def at_least_float32(x: "torch.Tensor") -> "torch.Tensor":
    """``x`` in float32 if it is in a half type (bf16/fp16 under autocast); float64 stays float64."""
    import torch

    return x.to(torch.promote_types(x.dtype, torch.float32))
