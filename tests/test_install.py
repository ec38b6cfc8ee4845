"""The front door, as a new user meets it: `pip install -e .` with no flags in a fresh venv that
already holds torch, and the sdist built, installed into a fresh venv without torch, imported and
run. Both build npr._C from a copy of the source tree (the checkout is never touched) and take a
few minutes each: marked slow, run in CI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Checks the installed extension end to end: it loads, registers its ops, one op matches the
# reference, a C++ class works.
SMOKE = textwrap.dedent("""
    import torch, npr, npr._C
    from npr.block_pool import BlockPool
    x, w = torch.randn(5, 24), torch.rand(24) + 0.5
    torch.testing.assert_close(torch.ops.npr.rms_norm(x, w, 1e-6), npr.ref.rms_norm(x, w, 1e-6))
    pool = BlockPool(8, 4)
    assert pool.append(pool.create(), 6).slots == list(range(6))
    print("smoke ok", npr.__file__, torch.__version__)
""")


def _source_files() -> list[str]:
    """The files a clean clone of this checkout would hold (tracked + untracked-not-ignored)."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    skip = {".git", ".venv", ".venv-cuda", "build", "__pycache__", ".pytest_cache", ".hypothesis"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and p.suffix != ".so"]


def _copy_tree(dst: Path) -> Path:
    for f in _source_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("MAX_JOBS", "2")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 1500) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", str(path)], cwd=path.parent)
    return path / "bin" / "python"


@pytest.mark.slow
def test_plain_editable_install_in_a_venv_with_torch(tmp_path):
    """The case that used to fail (build isolation hid the venv's torch from setup.py): torch
    first, then `pip install -e .` exactly as typed; npr._C is built, imports and runs."""
    src = _copy_tree(tmp_path / "src")
    py = _venv(tmp_path / "venv")
    _run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], cwd=tmp_path)
    _run([str(py), "-m", "pip", "install", "-e", "."], cwd=src)
    assert list((src / "npr").glob("_C*.so")), "the editable build left no npr/_C*.so in the tree"
    out = _run([str(py), "-c", SMOKE], cwd=tmp_path)
    assert "smoke ok" in out and str(src / "npr") in out and "2.13.0" in out, out


@pytest.mark.slow
def test_sdist_is_complete_installs_and_runs(tmp_path):
    """The sdist holds every C++/CUDA source and header and the Triton kernels; installed with
    plain pip into a fresh venv without torch (the isolated build gets the pinned torch), it
    builds npr._C, which imports and runs from site-packages."""
    pytest.importorskip("build", reason="needs the `build` package ([test] extra)")
    src = _copy_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    # an sdist needs no compiler: skip build's check of the wheel build's requirements (ninja)
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
          "--outdir", str(dist)], cwd=src)
    (sdist,) = dist.glob("npr-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    need = [f for f in _source_files()
            if f.startswith(("csrc/", "npr/kernels/")) and f.endswith((".cpp", ".h", ".cu", ".cuh", ".py"))]
    need += ["setup.py", "pyproject.toml", "README.md"]
    missing = sorted(set(need) - names)
    assert not missing, f"the sdist lacks {missing}"
    py = _venv(tmp_path / "venv")
    _run([str(py), "-m", "pip", "install", str(sdist)], cwd=tmp_path)
    out = _run([str(py), "-c", SMOKE], cwd=tmp_path)
    assert "smoke ok" in out and "site-packages" in out and "2.13.0" in out, out
