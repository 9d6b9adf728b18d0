"""The CLI's own error, importable by every command without importing training/ (`recsys serve`)."""


class UsageError(Exception):
    """A bad flag combination found after parsing; reported as a one-line error (exit 2)."""
