"""ParallelDims / init_distributed on a single process, and the data-parallel mode resolution."""

from __future__ import annotations

import pytest
import torch

from ember.errors import EmberError
from ember.parallel import (ParallelConfig, ParallelDims, all_reduce_mean, autocast, barrier,
                            destroy_distributed, init_distributed, launched_by_torchrun, make_grad_scaler,
                            resolve_data_parallel)


def test_single_process_dims(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dims = init_distributed(device="cpu")
    assert (dims.world_size, dims.rank, dims.local_rank, dims.dp_size, dims.dp_rank) == (1, 0, 0, 1, 0)
    assert dims.device == torch.device("cpu") and dims.mesh is None
    assert dims.is_main and not dims.distributed
    assert not torch.distributed.is_initialized()  # no process group for one process
    barrier(dims)
    assert all_reduce_mean(torch.tensor(3.0), dims).item() == 3.0
    destroy_distributed()  # no-op


def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if not torch.cuda.is_available():
        assert init_distributed().device == torch.device("cpu")


def test_bad_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(EmberError, match="WORLD_SIZE.*HINT"):
        init_distributed(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(EmberError, match="RANK=5"):
        init_distributed(device="cpu")


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(EmberError, match="CUDA is not available"):
        init_distributed(device="cuda")


def test_resolve_data_parallel():
    one, two = ParallelDims(), ParallelDims(world_size=2, dp_size=2)
    assert resolve_data_parallel(ParallelConfig(), one) == "none"
    assert resolve_data_parallel(ParallelConfig(data_parallel="fsdp"), one) == "none"
    assert resolve_data_parallel(ParallelConfig(), two) == "fsdp"
    assert resolve_data_parallel(ParallelConfig(data_parallel="ddp"), two) == "ddp"
    assert resolve_data_parallel(ParallelConfig(data_parallel="none"), two) == "none"


def test_precision_helpers():
    one, two = ParallelDims(), ParallelDims(world_size=2, dp_size=2)
    fp32, bf16, fp16 = (ParallelConfig(mixed_precision=p) for p in ("fp32", "bf16", "fp16"))
    assert make_grad_scaler(one, fp32) is None and make_grad_scaler(one, bf16) is None
    assert isinstance(make_grad_scaler(one, fp16), torch.amp.GradScaler)
    x = torch.randn(4, 4)
    with autocast(one, fp32):
        assert (x @ x).dtype == torch.float32
    with autocast(one, bf16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(two, bf16):  # FSDP2: the MixedPrecisionPolicy casts, no autocast
        assert (x @ x).dtype == torch.float32
    with autocast(two, fp16):
        assert (x @ x).dtype == torch.float16


def test_launched_by_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched_by_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_by_torchrun()


def test_bad_choice_is_a_clear_error():
    with pytest.raises(EmberError, match="parallel.mixed_precision='fp8'.*HINT"):
        resolve_data_parallel(ParallelConfig(mixed_precision="fp8"), ParallelDims())
