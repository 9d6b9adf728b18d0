"""Log formats (service/core/logs.py): the request id on a line logged inside a request, none
outside; JSON lines parse; faiss's start-up INFO lines are kept out. The live server's lines are
checked end to end in tests/e2e/test_surface.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from service.core.logs import dict_config, format_from_env, request_id


def _lines(fmt: str) -> list[str]:
    code = ("import logging, logging.config\n"
            "from service.core.logs import dict_config, request_id\n"
            f"logging.config.dictConfig(dict_config({fmt!r}))\n"
            "import faiss\n"
            "log = logging.getLogger('recsys.test')\n"
            "log.info('outside')\n"
            "token = request_id.set('req-1')\n"
            "try:\n    raise ValueError('boom')\nexcept ValueError:\n    log.exception('inside')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    return proc.stderr.splitlines()


def test_text_lines_tag_the_request_id_inside_a_request_only() -> None:
    lines = _lines("text")
    assert lines[0].endswith("INFO recsys.test: outside")  # the first line: no faiss lines before it
    assert lines[1].endswith("ERROR recsys.test [req-1]: inside") and "ValueError: boom" in lines[-1]


def test_json_lines_parse_and_carry_the_request_id() -> None:
    records = [json.loads(line) for line in _lines("json")]
    assert [r["message"] for r in records] == ["outside", "inside"]
    assert "request_id" not in records[0] and records[1]["request_id"] == "req-1"
    assert "ValueError: boom" in records[1]["exc"] and records[1]["level"] == "ERROR"


def test_a_bad_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="RECSYS_LOG_FORMAT must be one of"):
        format_from_env()
    with pytest.raises(ValueError):
        dict_config("xml")
    assert request_id.get() is None
    logging.getLogger(__name__).debug("no request here")
