"""Build spa-lite's wheel from a copy of the sources and install it into a fresh virtual environment outside the
checkout, the way a user (or `pip install git+URL` on Colab) gets it: nothing is downloaded.

The new environment sees the running interpreter's installed dependencies through a .pth line (a venv made
from a venv does not inherit the parent's packages with --system-site-packages); spa-lite itself comes only
from the wheel: the environment's own site-packages come first on sys.path, and the checkout is never on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what the build reads: pyproject.toml names these (README is the long description, LICENSE the license file)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "spa_lite", "recipes")


@dataclass
class Installed:
    venv: Path
    wheel: Path
    build_log: str
    install_log: str

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def spa_lite(self) -> Path:
        return self.venv / "bin" / "spa-lite"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
        env.update(PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="default::DeprecationWarning:spa_lite", **extra)
        return env


def _run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{out[-4000:]}")
    return out


def build_wheel(workdir: Path) -> tuple[Path, str]:
    """`pip wheel --no-deps --no-build-isolation` on a copy of the sources (the checkout gets no build/ folder)."""
    src = workdir / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        s = ROOT / name
        if s.is_dir():
            shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(s, src / name)
    dist = workdir / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "-w", dist, src], cwd=workdir, env=env)
    (wheel,) = dist.glob("spa_lite-*.whl")
    return wheel, log


def install_wheel(wheel: Path, venv: Path) -> str:
    """A fresh venv (no pip of its own: the running pip installs into it) with the wheel and nothing else."""
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_spa_lite_test_deps.pth").write_text("".join(d + "\n" for d in sorted(deps)))
    return _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
                 "--force-reinstall", wheel], cwd=venv.parent,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def build_and_install(workdir: Path) -> Installed:
    wheel, build_log = build_wheel(workdir)
    venv = workdir / "venv"
    install_log = install_wheel(wheel, venv)
    return Installed(venv, wheel, build_log, install_log)
