"""One typed manifest of a published version (DESIGN.md §5), validated once when it is read.

Training builds a `Manifest` and writes it (`write`); the service reads it (`Manifest.load`) and
then uses attributes, never string keys. `to_dict()` gives back exactly the JSON today's exporter
writes (same keys, same order, same values), and a manifest read from a file writes back
unchanged, keys this code does not know included (`extra` of each block).

Why frozen dataclasses rather than pydantic models: the acceptance rules and messages are the
service's (ArtifactError text that tests and operators read: "files.items is missing", "serving.stages
must be a non-empty prefix ..."), a few values are deliberately left unchecked as they always were,
and the JSON must come back key for key in the writer's order, null versus absent included;
hand-written readers over dataclasses say all of that in a few lines, where pydantic would need
strict mode, error translation and custom serialisers to do the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.contract.blocks import Block, BlockError, Catalog, Data, Dims, Files, Index, Retrieval, optional
from service.contract.layout import MANIFEST, TMP_PREFIX, ContractError
from service.contract.stage_blocks import Checks, Item2Item, Prerank, Rerank, Serving

FORMAT = 1
SUPPORTED_FORMATS = (1,)
REQUIRED_KEYS = ("format", "version", "created_at", "data", "item_count", "dims", "files", "retrieval", "index",
                 "prerank")
REQUIRED_FILES = ("catalog", "retrieval_onnx", "items", "index", "prerank_user_onnx", "prerank_items",
                  "prerank_features")
RERANK_FILES = ("rerank_onnx", "rerank_items")
OPTIONAL_FILES = ("retrieval_onnx_data", "item2item", "pair_items")  # checked when named
# the served cuts in order; a version serves a non-empty prefix (`serving.stages`, set by the publish gate)
STAGES = ("retrieval", "prerank", "rerank")


@dataclass(frozen=True)
class Manifest(Block):
    """manifest.json of one version; see the blocks in service/contract/blocks.py and stage_blocks.py."""

    format: int = FORMAT
    version: str = ""
    created_at: str = ""  # ISO 8601, UTC
    data: Data = field(default_factory=Data)
    item_count: int = 0  # N
    dims: Dims = field(default_factory=Dims)
    files: Files = field(default_factory=Files)
    catalog: Catalog | None = None
    retrieval: Retrieval = field(default_factory=Retrieval)
    index: Index = field(default_factory=Index)
    prerank: Prerank = field(default_factory=Prerank)
    rerank: Rerank | None = None  # written as null without a re-ranker
    item2item: Item2Item | None = optional()
    serving: Serving | None = optional()  # the stage gate's record
    checks: Checks | None = optional()

    @classmethod
    def from_dict(cls, d: Any, source: str | Path = MANIFEST) -> Manifest:
        """Validate a parsed manifest.json; ContractError naming `source` and the field otherwise."""
        try:
            return _parse(d, str(source))
        except BlockError as exc:
            raise ContractError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read and validate `path` (a version folder's manifest.json); the folder must be named
        after the version (or be the publish's temp folder of it)."""
        path = Path(path)
        if not path.is_file():
            raise ContractError(f"{path.parent}: {path.name} is missing")
        m = cls.from_dict(read_json(path), path)
        if path.parent.name not in (m.version, f"{TMP_PREFIX}{m.version}"):  # .tmp-: checked before publish
            raise ContractError(f"{path}: version {m.version!r} does not match the folder {path.parent.name!r}")
        return m

    def write(self, path: str | Path) -> None:
        """manifest.json as the exporter always wrote it (2-space indent, a final newline)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")

    def _fresh(self) -> dict[str, Any]:
        out = super()._fresh()
        out["rerank"] = self.rerank  # null when there is none
        return out

    @property
    def has_rerank(self) -> bool:
        return self.rerank is not None

    def served_stages(self) -> tuple[str, ...] | None:
        """`serving.stages` (what the publish gate chose), None when the version does not say."""
        if self.serving is None or self.serving.stages is None:
            return None
        return tuple(self.serving.stages)

    def with_(self, **changes: Any) -> Manifest:
        """A copy with some fields replaced (the manifest is immutable)."""
        return replace(self, **changes)


def _parse(d: Any, source: str) -> Manifest:
    if not isinstance(d, dict):
        raise ContractError(f"{source}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ContractError(f"{source}: missing keys {missing}")
    if d["format"] not in SUPPORTED_FORMATS:
        raise ContractError(f"{source}: format {d['format']!r} is not one of {SUPPORTED_FORMATS}")
    for key, kind in (("version", str), ("dims", dict), ("files", dict), ("index", dict), ("data", dict)):
        if not isinstance(d[key], kind):
            raise ContractError(f"{source}: {key} must be a JSON {'string' if kind is str else 'object'}, "
                                f"got {d[key]!r:.80}")
    n = d["item_count"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ContractError(f"{source}: item_count must be an integer >= 1, got {n!r}")
    rerank = None if d.get("rerank") is None else Rerank.from_dict(d["rerank"])
    serving = None if d.get("serving") is None else Serving.from_dict(d["serving"])
    _check_stages(source, serving, rerank is not None)
    files = Files.from_dict(d["files"])
    _check_files(source, files, rerank is not None)
    prerank = Prerank.from_dict(d["prerank"])
    if prerank.serving is not None and prerank.serving.pair_prior is not None and not files.has("pair_items"):
        raise ContractError(f"{source}: prerank.serving.pair_prior needs files.pair_items (the pair features' item columns)")
    item2item, checks = d.get("item2item"), d.get("checks")
    known = {"format", "version", "created_at", "data", "item_count", "dims", "files", "catalog", "retrieval",
             "index", "prerank", "rerank", "item2item", "serving", "checks"}
    return Manifest(
        format=d["format"], version=d["version"], created_at=d["created_at"], data=Data.from_dict(d["data"]),
        item_count=n, dims=Dims.from_dict(d["dims"]), files=files,
        catalog=None if d.get("catalog") is None else Catalog.from_dict(d["catalog"]),
        retrieval=Retrieval.from_dict(d["retrieval"]), index=Index.from_dict(d["index"]),
        prerank=prerank, rerank=rerank,
        item2item=None if not item2item else Item2Item.from_dict(item2item),  # {}: none, as always
        serving=serving, checks=None if checks is None else Checks.from_dict(checks),
        extra={k: v for k, v in d.items() if k not in known} | ({"item2item": item2item} if item2item == {} else {}),
        keys=tuple(d))


def _check_stages(source: str, serving: Serving | None, has_rerank: bool) -> None:
    """`serving.stages`, when present, is a non-empty prefix of STAGES, with "rerank" only in a
    version that has the re-rank files."""
    if serving is None or not serving.has("stages"):
        return
    stages = serving.stages
    if not isinstance(stages, list) or not stages or tuple(stages) != STAGES[: len(stages)]:
        raise ContractError(f"{source}: serving.stages must be a non-empty prefix of {list(STAGES)}, got {stages!r}")
    if "rerank" in stages and not has_rerank:
        raise ContractError(f"{source}: serving.stages names rerank but the version has no re-ranker")


def needed_files(m: Manifest) -> tuple[str, ...]:
    """The roles whose files a version must have: the required ones, the re-ranker's with one,
    the optional ones it names."""
    return _roles(m.files, m.has_rerank)


def _roles(files: Files, has_rerank: bool) -> tuple[str, ...]:
    return REQUIRED_FILES + (RERANK_FILES if has_rerank else ()) + tuple(k for k in OPTIONAL_FILES if files.has(k))


def _check_files(source: str, files: Files, has_rerank: bool) -> None:
    for role in _roles(files, has_rerank):
        if not files.has(role):
            raise ContractError(f"{source}: files.{role} is missing")
        check_file_name(source, role, getattr(files, role))


def check_file_name(source: str, role: str, name: object) -> None:
    """files.<role> must be a plain file name: no path separator, no dot file, no NUL."""
    if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name
            or "\x00" in name):
        raise ContractError(f"{source}: files.{role} = {name!r} is not a file name inside the version folder")


def read_json(path: Path) -> Any:
    """A JSON file of the contract; ContractError for bytes that are not UTF-8 JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path}: not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path}: not valid JSON: {exc}") from None


def created_at(folder: Path) -> str | None:
    """The version's created_at, read leniently (None for a folder that is not a readable version);
    what listing, pruning and rollback order versions by."""
    try:
        return str(json.loads((folder / MANIFEST).read_text())["created_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, tuple | np.ndarray):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
