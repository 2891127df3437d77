"""Devices: where a model runs, and whether a requested device (and dtype) can run at all.

masq_fx runs on the CPU and on CUDA. Everything a run creates (capture example inputs, decoder
inputs, statistics, scale tables, KV caches, lowered kernels) follows the device of the model's
parameters; :func:`place` checks a requested device and moves the model there. Checkpoints are
device-independent (their tensors are saved from the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from masq_fx.errors import InputError

__all__ = ["check_dtype", "default_device", "model_device", "place", "resolve_device"]

#: device types masq_fx runs on
DEVICE_TYPES = ("cpu", "cuda")


def default_device() -> str:
    """``"cuda"`` when CUDA is available, else ``"cpu"`` (the command line's default)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, checked to exist here (:class:`InputError` naming the fix otherwise)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(device)!r}: use 'cpu' or 'cuda' ('cuda:N' for the N-th GPU)") from None
    if resolved.type not in DEVICE_TYPES:
        raise InputError(f"device {str(device)!r} is not supported: masq_fx runs on 'cpu' or 'cuda'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch finds no CUDA GPU"
            raise InputError(
                f"device {str(device)!r} requested, but CUDA is not available ({why}, torch {torch.__version__}): "
                "use the CPU (--device cpu, device='cpu'), or run on a machine with a GPU and a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise InputError(f"device {str(device)!r} requested, but there are {count} CUDA devices: use cuda:0 … cuda:{count - 1}")
    return resolved


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse (:class:`InputError`) a float ``dtype`` the ``device`` cannot compute a linear in."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise InputError(
            f"{torch.cuda.get_device_name(device)} has no bfloat16 support: use float32 (--dtype float32), "
            "or a GPU of compute capability 8.0 or newer"
        )
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        F.linear(x, x)
    except RuntimeError as error:
        name = str(dtype).removeprefix("torch.")
        raise InputError(f"{device.type} cannot run {name} linears here ({error}): use float32 (--dtype float32)") from None


def place(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """Check ``device`` (``None``: where ``model``'s parameters are) and ``model``'s dtype on it, and move
    ``model`` there (in place, as ``model.to(device)``); returns the device."""
    target = model_device(model) if device is None else resolve_device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    parameter = next(model.parameters(), None)
    if parameter is not None:
        check_dtype(target, parameter.dtype)
        if parameter.device != target or any(t.device != target for t in (*model.parameters(), *model.buffers())):
            model.to(target)
    return target
