"""CORS is off unless RECSYS_CORS_ORIGINS names origins (issue 24): a preflight gets 405 and no
CORS header. The configured case is tested against a live server (tests/e2e/test_surface.py)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.core.config import Settings
from service.main import create_app


def test_without_origins_a_preflight_is_refused(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(artifacts=tmp_path)))  # no lifespan: nothing is loaded
    r = client.options("/v1/recommend", headers={"Origin": "https://shop.example.com",
                                                 "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    assert len(r.headers["x-request-id"]) == 32


def test_origins_are_read_comma_separated() -> None:
    s = Settings(cors_origins="https://a.example, https://b.example")  # type: ignore[arg-type]
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert Settings().cors_origins == ()
