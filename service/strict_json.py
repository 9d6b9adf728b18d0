"""Strict JSON for request bodies and the finiteness checks of artifact files. NumPy only.

`json.loads` accepts what no client of this API should send and the service then cannot
answer: `NaN` / `Infinity` and numbers that overflow to infinity (`1e400`), lone surrogates
(`"\\ud800"`, which cannot be encoded back to UTF-8), and nesting deep enough to exhaust the
interpreter's recursion limit. :func:`loads` refuses each with a :class:`BodyError` whose `loc`
names the field (("body", "history", 0)), so the request is a 422 rather than a 500 when the
answer (or the 422 echoing the value) is rendered.

The same tree walk names the first non-finite number of a version's JSON files, and
:func:`first_nonfinite_row` the first bad row of a version's arrays (service/artifacts.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

MAX_DEPTH = 32  # arrays / objects inside each other; the API's deepest body (a batch's filters) is 5
# a \uD800-\uDFFF escape: the only way a surrogate gets into a string that was valid UTF-8
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_ROWS_PER_CHUNK = 1 << 16  # rows checked at a time (a bounded temporary, even for a 1M-row memory map)

Loc = tuple[str | int, ...]


class BodyError(ValueError):
    """A request body that is not strict JSON; `loc` is the field's path, starting with "body"."""

    def __init__(self, loc: Loc, msg: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc = loc
        self.msg = msg


def loads(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a UTF-8 JSON body; BodyError for bytes that are not UTF-8 JSON, nesting deeper than
    max_depth, a number that is not finite or a string holding a lone surrogate."""
    if len(body) > max_depth and (body.count(b"[") + body.count(b"{")) > max_depth:
        depth = nesting_depth(body)  # only a body with that many brackets can be that deep
        if depth > max_depth:
            raise BodyError(("body",), f"nested {depth} levels deep, more than {max_depth}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(("body",), f"not UTF-8 (byte {exc.start})") from None
    nonfinite: list[str] = []

    def number(s: str) -> float:
        value = float(s)
        if not math.isfinite(value):
            nonfinite.append(s)
        return value

    def constant(s: str) -> float:
        nonfinite.append(s)
        return float(s)

    try:
        obj = json.loads(text, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise BodyError(("body",), f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise BodyError(("body",), f"not valid JSON: {type(exc).__name__}: {str(exc)[:100]}") from None
    if nonfinite or _SURROGATE_ESCAPE.search(text):
        bad = first_bad_value(obj)
        if bad is not None:
            path, why = bad
            raise BodyError(("body", *path), why)
    return obj


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of [ and { outside strings (brackets need not balance)."""
    skeleton = _STRING.sub(b"", body).translate(None, delete=bytes(set(range(256)) - set(b"[]{}")))
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def first_bad_value(obj: Any) -> tuple[Loc, str] | None:
    """The path of the first non-finite number or string with a lone surrogate (keys included) in
    a parsed JSON tree, and what is wrong with it; None when there is none. Iterative: no
    recursion limit."""
    for path, value in _walk(obj):
        if isinstance(value, float) and not math.isfinite(value):
            return path, f"must be a finite number, got {value!r}"
        if isinstance(value, str) and has_surrogate(value):
            return path, "contains a lone surrogate (\\ud800-\\udfff), which is not a Unicode character"
    return None


def first_nonfinite(obj: Any) -> tuple[Loc, float] | None:
    """The path and value of the first non-finite number in a parsed JSON tree, else None."""
    for path, value in _walk(obj):
        if isinstance(value, float) and not math.isfinite(value):
            return path, value
    return None


def has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _walk(obj: Any) -> Iterator[tuple[Loc, Any]]:
    """(path, value) of every key and leaf, depth first, in document order."""
    stack: list[tuple[Loc, Any]] = [((), obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for k in value:
                yield (*path, k), k
            stack.extend(((*path, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(value))))
        else:
            yield path, value


def first_nonfinite_row(arr: np.ndarray) -> int | None:
    """The first row (index along axis 0) of a floating array holding NaN or inf, else None;
    checked a chunk of rows at a time so a memory-mapped array is never copied whole."""
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return None
    if arr.ndim == 0:
        return None if np.isfinite(arr) else 0
    for start in range(0, arr.shape[0], _ROWS_PER_CHUNK):
        chunk = np.asarray(arr[start:start + _ROWS_PER_CHUNK])
        ok = np.isfinite(chunk).reshape(chunk.shape[0], -1).all(axis=1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None
