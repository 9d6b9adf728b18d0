"""The real redis-server fixtures live in tests/service/conftest.py; share them here."""

from tests.service.conftest import redis_server, redis_url  # noqa: F401
