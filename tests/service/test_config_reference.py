"""One configuration reference (issue 24), rendered from the Settings model: the README's table
and .env.example are exactly what `recsys config` renders, a .env file is read (the environment
wins), and `recsys config` prints each setting's default, current value and source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.core.config import Settings
from service.core.reference import env_example, markdown_table, rows

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- settings-table:start -->\n", "<!-- settings-table:end -->"


def test_the_readme_table_is_the_rendered_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    assert START in readme and END in readme
    table = readme.split(START, 1)[1].split(END, 1)[0]
    assert table == markdown_table(), "regenerate it: recsys config --markdown"
    assert len(table.strip().splitlines()) == 2 + len(Settings.model_fields)  # every setting, once


def test_env_example_is_the_rendered_reference() -> None:
    assert (ROOT / ".env.example").read_text() == env_example(), "regenerate it: recsys config --env-example"
    assert all(f"# RECSYS_{name.upper()}=" in env_example() for name in Settings.model_fields)


def test_a_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"RECSYS_{name.upper()}", raising=False)
    (tmp_path / ".env").write_text("RECSYS_RETRIEVAL_K=300\nRECSYS_LOG_FORMAT=json\nRECSYS_API_KEY=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECSYS_LOG_FORMAT", "text")
    s = Settings()
    assert (s.retrieval_k, s.log_format, s.api_key) == (300, "text", "from-dotenv")
    by_name = {r.variable: r for r in rows(s)}
    assert by_name["RECSYS_RETRIEVAL_K"].source.value == ".env" and by_name["RECSYS_RETRIEVAL_K"].current == "300"
    assert by_name["RECSYS_LOG_FORMAT"].source.value == "environment"
    assert by_name["RECSYS_PRERANK_N"].source.value == "default" and by_name["RECSYS_PRERANK_N"].default == "30"
    assert by_name["RECSYS_API_KEY"].current == "********"  # never printed


def test_recsys_config_prints_default_value_and_source(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RECSYS_MAX_USERS=5000\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RECSYS_")}
    env.update(RECSYS_CORS_ORIGINS="https://a.example, https://b.example", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "recsys_cli", "config"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(lines) == {f"RECSYS_{name.upper()}" for name in Settings.model_fields}
    assert lines["RECSYS_MAX_USERS"] == ["RECSYS_MAX_USERS", "100000", "5000", ".env"]
    assert lines["RECSYS_CORS_ORIGINS"] == ["RECSYS_CORS_ORIGINS", "-", "https://a.example,https://b.example",
                                            "environment"]
    assert lines["RECSYS_TIMEOUT_MS"] == ["RECSYS_TIMEOUT_MS", "100.0", "100.0", "default"]
    bad = subprocess.run([sys.executable, "-m", "recsys_cli", "config"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={**env, "RECSYS_PRERANK_N": "0"})
    assert bad.returncode == 2 and bad.stderr.startswith("recsys config: error: bad RECSYS_* setting: prerank_n")
