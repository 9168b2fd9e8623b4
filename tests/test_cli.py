"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools import paths
from tools.bench_catalog import generate_catalog
from tools.cli import build_parser
from tools.loader import load_catalog

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command, capsys):
    argv = [command, "--help"] if command else ["--help"]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    assert "usage: python -m tools" in capsys.readouterr().out


def test_real_process_exit_codes(ws):
    run = [sys.executable, "-m", "tools", "validate", *ws.args()]
    ok = subprocess.run(run, cwd=paths.ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "3 papers" in ok.stdout
    path = ws.entry_path("tome")
    path.write_text(path.read_text(encoding="utf-8") + "colour: red\n", encoding="utf-8")
    bad = subprocess.run(run, cwd=paths.ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "colour: unknown key" in bad.stderr


def test_generated_benchmark_catalog_is_valid(tmp_path):
    generate_catalog(tmp_path / "catalog", 30)
    (tmp_path / "reference").mkdir()
    assert len(load_catalog(tmp_path / "catalog", tmp_path / "reference").entries) == 30
