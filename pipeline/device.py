"""Device choice and mixed precision."""
from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from typing import ContextManager

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for, but CUDA is not available here; use device=auto or cpu")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return dev.type


def autocast(dev: torch.device) -> ContextManager:
    """bf16 autocast on GPUs that support it, fp16 on older ones; full precision on CPU."""
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def configure(dev: torch.device, cudnn_benchmark: bool = True) -> None:
    """cuDNN autotuning (unless turned off) and TF32 matmuls on CUDA (results stay seeded, not bit-exact).
    Autotuning searches algorithms once per new convolution shape: on an H200 the first smoke meta-iteration took
    44.8 s; whether the search pays off for fine-tunes whose batch shapes change with k is not measured yet."""
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def use_channels_last(setting: str, dev: torch.device, second_order: bool = False) -> bool:
    """'auto': channels-last on GPUs, and on CPU unless `second_order` work runs through autograd's double
    backward (unrolled MAML). Measured on the 2-core CPU (tf_efficientnet_lite0, 64 px,
    benchmarks/double_backward.py, 100 images): a forward+backward went 0.66 s -> 0.38 s, but a double backward
    3.31 s -> 4.13 s; the reverse sweep's forward-over-reverse products do not lose (benchmarks/meta_throughput.py)."""
    if setting != "auto":
        return setting == "on"
    return dev.type == "cuda" or not second_order


# Meta iterations from which compiling pays: the first meta-batch compiles for 10-140 s, after which each iteration
# runs 1-12 s faster on the 2-core CPU (reptile to second-order MAML; docs/benchmarks.md), so by 50 iterations
# compiling has paid for itself for every algorithm that uses it.
COMPILE_PAYS_AFTER = 50


def use_compile(setting: str, iterations: int, dev: torch.device) -> bool:
    """'auto' (`meta.compile`): compile on CPU when the run has at least `COMPILE_PAYS_AFTER` iterations and a C++
    compiler is installed (inductor needs one). Not on GPUs: compiled meta-learning has not been measured on one
    yet (docs/gpu.md), so there 'on' asks for it. 'on'/'off' as said."""
    if setting != "auto":
        return setting == "on"
    if iterations < COMPILE_PAYS_AFTER or dev.type != "cpu":
        return False
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
