"""Device choice for ONNX Runtime and FAISS, made in one place.

"auto" uses CUDA when the installed packages can, "cuda" asks for it and falls back to the CPU with
a logged warning, "cpu" never touches a GPU. The truth is read back after creating the session:
onnxruntime-gpu lists CUDAExecutionProvider even on a machine with no GPU.
"""

from __future__ import annotations

import enum
import logging

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def ort_providers(device: Device, available: list[str]) -> list[str]:
    """Providers to request, in priority order (onnxruntime falls back along the list)."""
    device = Device(device)
    if device is Device.cpu:
        return [CPU_EP]
    if CUDA_EP in available:
        return [CUDA_EP, CPU_EP]
    if device is Device.cuda:
        log.warning("--device cuda: onnxruntime has no CUDA provider (install the [gpu] extra); using the CPU")
    return [CPU_EP]


def ort_device_used(device: Device, session_providers: list[str]) -> str:
    """What the session actually runs on; warns when CUDA was asked for and not obtained."""
    used = "cuda" if session_providers and session_providers[0] == CUDA_EP else "cpu"
    if Device(device) is Device.cuda and used != "cuda":
        log.warning("--device cuda: the CUDA provider could not start (no GPU?); running on the CPU")
    return used


def faiss_use_gpu(device: Device, num_gpus: int) -> bool:
    """Whether to move a FAISS index to the GPU; warns when asked and impossible."""
    device = Device(device)
    if device is Device.cpu:
        return False
    if num_gpus > 0:
        return True
    if device is Device.cuda:
        log.warning("--device cuda: FAISS sees no GPU (faiss-cpu installed, or no device); searching on the CPU")
    return False


def torch_device(device: Device, cuda_available: bool) -> str:
    """Where torch trains: "cuda" when asked (or auto) and torch sees a GPU; warns when asked and impossible.

    cuda_available: torch.cuda.is_available(), passed in so this module never imports torch.
    """
    device = Device(device)
    if device is Device.cpu:
        return "cpu"
    if cuda_available:
        return "cuda"
    if device is Device.cuda:
        log.warning("--device cuda: torch sees no GPU (CPU build, or no device); training on the CPU")
    return "cpu"
