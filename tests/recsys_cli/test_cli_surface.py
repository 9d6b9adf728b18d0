"""The CLI's surface (issue 24): every flag has help and shows its default, a wrong flag prints
the usage of the sub-command it was given to, `recsys --help` imports no command (timed and
printed, not asserted: the figure depends on the machine), `serve` refuses a taken port before
it loads anything."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from recsys_cli.main import build_parser

HELP_ACTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                out += _parsers(sub)
    return out


def test_every_flag_has_help_and_shows_its_default() -> None:
    missing, no_default = [], []
    for parser in _parsers(build_parser(full=True)):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, HELP_ACTIONS):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(name)
                continue
            shown = formatter._expand_help(action)
            if action.option_strings and not action.required and "default" not in shown.lower():
                no_default.append(name)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help does not show the default: {no_default}"


def test_wrong_flag_prints_the_subcommands_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "recsys_cli", "config", "--no-such-flag"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: recsys config "), proc.stderr
    assert "recsys config: error: unrecognized arguments: --no-such-flag" in proc.stderr


def test_top_level_help_imports_no_command_and_is_timed() -> None:
    code = ("import sys, time; t = time.perf_counter(); from recsys_cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('recsys_cli.commands.', 'torch', 'service', "
            "'training'))), file=sys.stderr)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "config" in proc.stdout and "serve" in proc.stdout  # every command listed
    assert proc.stderr.strip() == "[]", f"imported by `recsys --help`: {proc.stderr}"
    print(f"recsys --help: {wall:.2f} s wall (a fresh interpreter)")


def test_serve_refuses_a_taken_port_before_loading(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no artifacts at all: a port check after the model load would report those instead
        proc = subprocess.run([sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(tmp_path / "none"),
                               "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"recsys serve: error: cannot listen on 127.0.0.1:{port}: "
                                                "Address already in use"], proc.stderr
