#!/usr/bin/env python3
"""Set up and run the project with one command each.

    python dev.py build   # create .venv if needed, install, validate -> README -> site
    python dev.py test    # also installs Debian's chromium (as root) and the pinned Node
                          # tools (npm ci); lint, checks, awesome-lint, pytest

Only the Python standard library is used here, so this runs on a bare Python 3.11
with pip. Installation is skipped while pyproject.toml is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".installed"
NODE_MODULES = ROOT / "node_modules"
NODE_STAMP = NODE_MODULES / ".installed"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    # Material and the gen-files plugins print a notice about MkDocs 2.0 on every build;
    # mkdocs is pinned below 2 in pyproject.toml, so it is not actionable here.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if result.returncode:
        sys.exit(result.returncode)


def ensure_env() -> None:
    """A virtual environment with the project and its test extras installed."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"+ creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    # torch 2.14.1 + torchvision 0.29.1 lie on the project machines' disk (a CUDA
    # build that runs on the CPU, ~5.5 GB installed): timm's parity test needs
    # torchvision, which does not import beside the 2.13.0 CPU wheel. Installing the
    # pair first keeps pip from resolving anything newer from the index.
    run(PYTHON, "-m", "pip", "install", "--quiet", "torch==2.14.1", "torchvision==0.29.1")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[test]")
    STAMP.write_text(wanted + "\n")


def ensure_node_tools() -> None:
    """awesome-lint and axe-core at the versions package-lock.json pins (`npm ci`)."""
    wanted = hashlib.sha256((ROOT / "package-lock.json").read_bytes()).hexdigest()
    if NODE_STAMP.is_file() and NODE_STAMP.read_text().strip() == wanted:
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("! npm not found: install Node.js 20 or newer (Debian's nodejs and npm)")
    run(npm, "ci", "--no-audit", "--no-fund", "--loglevel=error")
    NODE_STAMP.write_text(wanted + "\n")


def ensure_browser() -> None:
    """Debian's Chromium for the site tests (never a browser build downloaded by a tool)."""
    if shutil.which("chromium"):
        return
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        print(
            "! chromium not found: install Debian's `chromium` package to run the browser "
            "tests (they skip without it, and fail under CI)",
            flush=True,
        )
        return
    run("apt-get", "update", "-qq")
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium")


def build() -> None:
    run(PYTHON, "-m", "tools", "build")
    run(BIN / "mkdocs", "build", "--strict", "--quiet")
    print(f"site: {ROOT / 'site'}; serve it with `.venv/bin/mkdocs serve`")


def test() -> None:
    ensure_browser()
    ensure_node_tools()
    run(PYTHON, "-m", "ruff", "check", ".")
    run(PYTHON, "-m", "ruff", "format", "--check", ".")
    run(PYTHON, "-m", "tools", "build", "--check")
    # The awesome-list convention (https://github.com/sindresorhus/awesome): zero errors.
    run(NODE_MODULES / ".bin" / "awesome-lint", "README.md")
    run(PYTHON, "-m", "pytest", "-q")


COMMANDS = {"build": build, "test": test}


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python dev.py {{{'|'.join(COMMANDS)}}}")
    ensure_env()
    COMMANDS[sys.argv[1]]()


if __name__ == "__main__":
    main()
