"""CPU fallback of every GPU path: CUDA asked for on a machine without it warns and runs on the CPU."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from simsearch.devices import CPU_EP, CUDA_EP, Device, faiss_use_gpu, ort_device_used, ort_providers, torch_device
from simsearch.encoders.runtime import OnnxEncoder
from simsearch.retrieval.faiss_index import LoadedIndex, build_index


def test_provider_choice():
    assert ort_providers(Device.cpu, [CUDA_EP, CPU_EP]) == [CPU_EP]
    assert ort_providers(Device.auto, [CUDA_EP, CPU_EP]) == [CUDA_EP, CPU_EP]
    assert ort_providers(Device.auto, [CPU_EP]) == [CPU_EP]


def test_cuda_request_without_cuda_warns_and_uses_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        assert ort_providers(Device.cuda, [CPU_EP]) == [CPU_EP]
        # onnxruntime-gpu lists CUDA even without a GPU: the session's providers tell the truth.
        assert ort_device_used(Device.cuda, [CPU_EP]) == "cpu"
        assert faiss_use_gpu(Device.cuda, num_gpus=0) is False
        assert torch_device(Device.cuda, cuda_available=False) == "cpu"
    assert sum("using the CPU" in r.message or "on the CPU" in r.message for r in caplog.records) == 4
    assert torch_device(Device.auto, cuda_available=True) == "cuda" and torch_device(Device.cpu, True) == "cpu"


def test_encoder_and_index_on_cuda_or_fall_back_to_cpu_with_a_warning(lite0, models_dir, caplog):
    """--device cuda: the GPU when it really works, else the CPU with a warning — never silently the CPU.

    Both outcomes are checked against what the session and the index report, so this holds on a GPU
    machine too (CI and this project's machines have none: there it checks the fallback)."""
    with caplog.at_level(logging.WARNING):
        enc = OnnxEncoder(lite0, Device.cuda, models_dir)
        vecs = np.eye(4, 8, dtype=np.float32)
        index = LoadedIndex(build_index(lambda: [(np.arange(4), vecs)], 8, 4).index, Device.cuda)
    warned = [r.message for r in caplog.records if "cuda" in r.message.lower()]
    assert enc.device == ("cuda" if enc.session.get_providers()[0] == CUDA_EP else "cpu")
    # faiss-cpu reports 0 GPUs (it has no get_num_gpus at all in some builds): then the index must be on the CPU.
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    assert index.device == ("cuda" if gpus > 0 else "cpu")
    if enc.device == "cpu" or index.device == "cpu":
        assert warned, "a CPU fallback must be logged"
    scores, ids = index.search(vecs[:1], 2)
    assert ids[0, 0] == 0 and scores[0, 0] == 1.0
