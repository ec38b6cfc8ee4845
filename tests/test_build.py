"""The compiled extension loads, registers torch.ops.npr, and its first op matches the reference."""
import re
import shutil
import subprocess

import pytest
import torch

import npr
from npr import _ext, ref


def test_extension_built():
    assert _ext.available(), "npr._C missing: " + str(_ext._IMPORT_ERROR)


@pytest.mark.parametrize("shape", [(1, 8), (3, 77), (2, 5, 576), (17, 1), (4, 1031)])
def test_rms_norm_matches_reference(shape):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    y = torch.ops.npr.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, ref.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_opcheck():
    x, w = torch.randn(4, 64), torch.randn(64)
    torch.library.opcheck(torch.ops.npr.rms_norm.default, (x, w, 1e-5))


def test_rms_norm_bad_input_names_problem():
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.npr.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.npr.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-6)


def test_wrapper_falls_back_for_other_dtypes():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16)
    assert npr.ops.rms_norm(x, w, 1e-6).dtype == torch.bfloat16


def test_import_without_the_extension_warns_once_and_falls_back():
    """With npr._C unavailable, `import npr` works, warns once naming the build command, the
    reference ops still run, and features that need the build raise a clear error."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "npr._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import npr, torch
            import npr.ops
        msgs = [str(x.message) for x in w if "npr._C" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "pip install -e . --no-build-isolation" in msgs[0]
        x, g = torch.randn(2, 8), torch.ones(8)
        torch.testing.assert_close(npr.ops.rms_norm(x, g, 1e-6), npr.ref.rms_norm(x, g, 1e-6))
        try:
            npr._ext.require("npr.Engine")
        except RuntimeError as e:
            assert "npr.Engine needs the compiled extension" in str(e)
        else:
            raise AssertionError("require() did not raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# Functions allowed to hold AVX-512 instructions: the variants chosen at run time (cpu_isa.h).
AVX512_VARIANTS = ("npr::Wide<npr::(anonymous namespace)::Avx512>::",
                   "npr::gemm_avx512::")  # the GEMM-panel kernel, called after use_avx512()
_LEGACY_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "66", "67", "f0", "f2", "f3"}


def _is_evex(raw_bytes: str) -> bool:
    """An instruction's bytes (objdump's hex field) start, after legacy prefixes, with 0x62: the
    EVEX prefix of every AVX-512 instruction (0x62 is no other opcode in 64-bit mode)."""
    for b in raw_bytes.split():
        if b not in _LEGACY_PREFIXES:
            return b == "62"
    return False


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_avx512_code_stays_in_its_variants():
    """The build targets AVX2; AVX-512 code may only sit in the functions that run after a CPU
    check. An AVX-512 instruction anywhere else (say an inline header function built under a
    target pragma) would crash with SIGILL on a CPU without AVX-512."""
    from npr import _C

    out = subprocess.run(["objdump", "-d", "-w", "-C", _C.__file__], capture_output=True,
                         text=True, check=True).stdout
    fn, found, bad = "", set(), set()
    for line in out.splitlines():
        if line.endswith(">:") and "<" in line:
            fn = line[line.index("<") + 1:-2]
            continue
        parts = line.split("\t")  # "  addr:", "bytes", "mnemonic operands"
        if len(parts) >= 3 and parts[0].strip().endswith(":") and _is_evex(parts[1]):
            (found if any(v in fn for v in AVX512_VARIANTS) else bad).add(fn)
    assert not bad, f"AVX-512 instructions outside the runtime-dispatched variants: {sorted(bad)[:5]}"
    assert found, "no AVX-512 variant found in npr._C (expected the attention and GEMM-panel ones)"


def test_cpu_isa_setting(monkeypatch):
    from npr import _C

    monkeypatch.setenv("NPR_CPU_ISA", "AVX2")
    assert _C.cpu_isa() == "avx2"
    # auto (and avx512, which cannot force what the CPU lacks): AVX-512 iff the kernel reports
    # the four extensions the variants are built for
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    expect = "avx512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags else "avx2"
    for setting in ("auto", "avx512", ""):
        monkeypatch.setenv("NPR_CPU_ISA", setting)
        assert _C.cpu_isa() == expect, setting
    monkeypatch.setenv("NPR_CPU_ISA", "sse")
    with pytest.raises(ValueError, match="NPR_CPU_ISA must be"):
        _C.cpu_isa()


def test_env_settings_are_cached_until_reload(monkeypatch):
    from npr import env

    monkeypatch.delenv("NPR_FORCE_REF", raising=False)
    env.reload()
    assert env.force_reference() is False
    monkeypatch.setenv("NPR_FORCE_REF", "1")
    assert env.force_reference() is False  # cached: ops ask on every call
    env.reload()
    assert env.force_reference() is True
