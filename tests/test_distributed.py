"""One device resolver for every command, and the ranks of a process run alone."""

from __future__ import annotations

import pytest
import torch

from biomass_cache.common.errors import DataError
from biomass_cache.common.distributed import Ranks, init_ranks, resolve_device, resolve_devices


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device("auto")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")  # a rank's GPU only when on CUDA
    with pytest.raises(DataError, match="--device cuda: no CUDA device is visible"):
        resolve_device("cuda")
    with pytest.raises(DataError, match=r"--devices cuda:1: no CUDA device"):
        resolve_devices(["cpu", "cuda:1"])


@pytest.mark.parametrize("name", ["foo", "meta", "cuda:x"])
def test_not_a_device_names_the_flag(name):
    with pytest.raises(DataError, match=rf"--device '{name}': not a cpu or cuda device"):
        resolve_device(name)
    with pytest.raises(DataError, match=rf"--devices '{name}': not a cpu or cuda device"):
        resolve_devices(["cpu", name])


def test_cuda_is_the_local_rank_and_counted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # under torchrun: this rank's GPU
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 1)
    assert resolve_devices(["cuda", "cuda:1"]) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(DataError, match="--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(DataError, match="devices of one kind"):
        resolve_devices(["cpu", "cuda:0"])


def test_a_process_run_alone_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks, device = init_ranks("cpu")
    assert ranks == Ranks(0, 1, 0, False) and device == torch.device("cpu")
    assert ranks.broadcast({"a": 1}) == {"a": 1} and ranks.gather(5) == [5]
    ranks.barrier()  # no process group: nothing to wait for
