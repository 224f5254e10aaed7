"""Where and how fast a model runs: device choice, bf16/fp16 autocast, backend flags, compile.

Every verb that runs a model (training, inference, serving) asks these helpers, so ``--device
auto`` and ``--dtype auto`` mean the same everywhere. They sit below every other layer: nothing
here knows about tasks, checkpoints or runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import torch

from fromzero.errors import FromzeroError


def resolve_device(name: str) -> torch.device:
    """auto picks cuda > mps > cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FromzeroError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FromzeroError(f"device {name!r} requested but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FromzeroError("device 'mps' requested but MPS is not available here")
    return device


def fast_bf16_available(device: torch.device) -> bool:
    """True where bf16 matmuls are native: CUDA GPUs with bf16 (Ampere+), CPUs with
    AVX512-BF16 or AMX (oneDNN), Apple MPS."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type == "mps"


def resolve_dtype(device: torch.device, dtype: str) -> str:
    """The compute dtype a run uses: ``auto`` becomes bfloat16 or float32 by hardware."""
    if dtype == "auto":
        return "bfloat16" if fast_bf16_available(device) else "float32"
    return dtype


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; float32 runs without autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise FromzeroError("train.dtype float16 needs a CUDA device (use bfloat16 on CPU)")
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 matmuls/convolutions: ~free accuracy-wise for training, much faster on Ampere+.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _cpp_compiler_available() -> bool:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    return any(shutil.which(n) for n in names)


def compile_model(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """torch.compile ``model``, or return it unchanged (with a warning) where compiling cannot
    work: inductor's CPU backend needs a C++ compiler."""
    if device.type == "cpu" and not _cpp_compiler_available():
        warnings.warn("train.compile: no C++ compiler (g++/clang++) found, which torch.compile "
                      "needs on CPU; training without compile", stacklevel=2)
        return model
    return torch.compile(model, mode=mode)


def is_compile_failure(e: BaseException) -> bool:
    """True for errors raised by torch.compile's machinery (not by the model's own code)."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
