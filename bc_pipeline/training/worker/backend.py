"""Choose the Keras backend and the device before Keras is imported, and fail fast when they are missing.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so :func:`select_backend` must run
first: the worker's entry point calls it before anything imports Keras. What cannot work (the
backend's package is not installed, a GPU was required and none is visible) raises
:class:`WorkerStartError` naming what is missing, within seconds and before any data is read.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Literal

Backend = Literal["tensorflow", "jax", "torch"]
DeviceChoice = Literal["auto", "gpu", "cpu"]
BACKENDS: dict[str, str] = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
INSTALL_HINT = {
    "tensorflow": "pip install 'bc_pipeline[gpu]' (or tensorflow)",
    "jax": "pip install 'bc_pipeline[jax]' (CPU) or 'jax[cuda12]' (NVIDIA GPU)",
    "torch": "pip install 'bc_pipeline[torch]'",
}


class WorkerStartError(RuntimeError):
    """The worker cannot start: a backend or a device it needs is missing (the message says which)."""


@dataclass(frozen=True)
class Device:
    """Where training runs: ``kind`` gpu or cpu, a description for the logs, and bf16 support."""

    backend: str
    kind: str
    description: str
    bf16: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.kind == "gpu"


def select_backend(backend: str) -> None:
    """Set ``KERAS_BACKEND`` for this process; refuse a backend that is not installed.

    Raises if Keras was already imported with another backend: it cannot switch afterwards.
    """
    if backend not in BACKENDS:
        raise WorkerStartError(f"unknown Keras backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        raise WorkerStartError(
            f"KERAS_BACKEND={backend}, but the {BACKENDS[backend]!r} package is not installed for "
            f"{sys.executable}: {INSTALL_HINT[backend]}"
        )
    if importlib.util.find_spec("keras") is None:
        raise WorkerStartError(f"keras is not installed for {sys.executable}: pip install 'keras>=3.8'")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise WorkerStartError(f"Keras is already imported with the {keras.backend.backend()} backend, not {backend}")
    os.environ["KERAS_BACKEND"] = backend
    if backend == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    elif "tensorflow" not in sys.modules and not any(isinstance(f, _HideTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _HideTensorFlow(backend))


class _HideTensorFlow:
    """An import hook that makes TensorFlow look absent to a worker on another backend.

    Keras imports TensorFlow whenever it is installed, only to seed it too
    (``keras.utils.set_random_seed``): 2-3 s and hundreds of MB for nothing on JAX or PyTorch.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"TensorFlow is not used by a {self.backend} worker", name=name)
        return None


def configure_device(backend: str, choice: str = "auto") -> Device:
    """Find the accelerator of ``backend``; with ``choice='gpu'`` refuse to run without one.

    TensorFlow gets memory growth, so it does not take all of the GPU's memory at start.
    """
    if choice not in ("auto", "gpu", "cpu"):
        raise WorkerStartError(f"device must be auto, gpu or cpu, not {choice!r}")
    device = {"tensorflow": _tensorflow_device, "jax": _jax_device, "torch": _torch_device}[backend](choice)
    if choice == "gpu" and not device.on_gpu:
        raise WorkerStartError(
            f"device=gpu, but the {backend} backend sees no GPU ({device.description}); check the NVIDIA driver "
            f"and the CUDA build of {backend} ({INSTALL_HINT[backend]}), or set device to auto or cpu"
        )
    return device


def _tensorflow_device(choice: str) -> Device:
    import tensorflow as tf

    if choice == "cpu":
        tf.config.set_visible_devices([], "GPU")
    gpus = tf.config.list_physical_devices("GPU") if choice != "cpu" else []
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised earlier in this process
            pass
    if not gpus:
        return Device("tensorflow", "cpu", f"CPU ({os.cpu_count()} cores)")
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability") or (0, 0)
    names = ", ".join(details.get("device_name", g.name) for g in gpus)
    return Device("tensorflow", "gpu", f"GPU x{len(gpus)}: {names}", bf16=tuple(capability) >= (8, 0))


def _jax_device(choice: str) -> Device:
    import jax

    if choice != "cpu":
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:  # no GPU platform in this jaxlib
            gpus = []
        if gpus:
            capability = getattr(gpus[0], "compute_capability", "0.0")
            major = int(str(capability).split(".")[0] or 0)
            return Device("jax", "gpu", f"GPU x{len(gpus)}: {gpus[0].device_kind}", bf16=major >= 8)
    else:
        jax.config.update("jax_platforms", "cpu")
    return Device("jax", "cpu", f"CPU ({os.cpu_count()} cores)")


def _torch_device(choice: str) -> Device:
    import torch

    if choice != "cpu" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return Device("torch", "gpu", f"GPU x{count}: {torch.cuda.get_device_name(0)}", bf16=torch.cuda.is_bf16_supported())
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return Device("torch", "cpu", f"CPU ({torch.get_num_threads()} threads)")


def precision_policy(choice: str, device: Device) -> str:
    """The Keras dtype policy: mixed bf16 on a GPU that has it (Ampere and later), fp16 on older ones.

    ``auto`` uses mixed precision on a GPU only: on a CPU it is slower than float32. bf16 keeps
    float32's exponent range, so it needs no loss scaling; fp16 gets Keras' loss scaling.
    """
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"mixed_precision must be auto, on or off, not {choice!r}")
    if choice == "off" or (choice == "auto" and not device.on_gpu):
        return "float32"
    return "mixed_bfloat16" if device.bf16 or not device.on_gpu else "mixed_float16"


def use_jit(choice: str, device: Device) -> bool:
    """XLA compilation of the train step. ``auto``: on with JAX, on the GPU and the CPU alike.

    JAX always runs through XLA (without ``jit`` it executes op by op, many times slower), so JAX is
    the backend for XLA on a GPU. TensorFlow's XLA has no kernel for ``ScaleAndTranslate``, the
    antialiased resize every zoo model starts with (measured: the train step fails to compile), so
    ``auto`` leaves it off there; on PyTorch ``jit_compile`` means ``torch.compile``, also off.
    """
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"jit_compile must be auto, on or off, not {choice!r}")
    if choice != "auto":
        return choice == "on"
    return device.backend == "jax"
