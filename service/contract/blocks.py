"""The typed blocks of a version's manifest.json (service/contract/manifest.py holds the whole).

Every block is a frozen dataclass: the fields code reads, typed, and `extra` for keys this code
does not know, so a manifest written by an older or newer exporter loads and writes back
unchanged. `keys` remembers the key order of a block read from a file (to_dict then writes the
same keys in the same order); a block built by training has keys=None and to_dict writes what
today's exporter writes (`_fresh`), in its order. Validation that needs the whole manifest
(required files, serving stages, messages naming the file) is in manifest.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

_B = TypeVar("_B", bound="Block")
_OPTIONAL = {"optional": True}  # field metadata: a fresh block writes the key only when it is set


def optional() -> Any:
    """A field a fresh block writes only when it is not None (today's exporter adds it later or sometimes)."""
    return field(default=None, metadata=_OPTIONAL)


class BlockError(ValueError):
    """A manifest value of the wrong kind; `where` is its dotted path (dims.maxlen)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where} {message}")
        self.where = where


@dataclass(frozen=True)
class Block:
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    keys: tuple[str, ...] | None = field(default=None, kw_only=True, compare=False, repr=False)

    @classmethod
    def _read(cls: type[_B], d: Any, where: str, **parsed: Any) -> _B:
        """The block of the JSON object `d`: `parsed` for the fields that need a check, the rest of
        the typed fields as read (None when absent), every other key in `extra`."""
        if not isinstance(d, dict):
            raise BlockError(where, f"must be a JSON object, got {d!r:.80}")
        names = {f.metadata.get("key", f.name): f.name for f in fields(cls) if f.name not in ("extra", "keys")}
        values = {name: parsed[name] if name in parsed else d.get(key) for key, name in names.items()}
        return cls(**values, extra={k: v for k, v in d.items() if k not in names}, keys=tuple(d))

    def _known(self) -> dict[str, Any]:
        return {f.metadata.get("key", f.name): getattr(self, f.name) for f in fields(self)
                if f.name not in ("extra", "keys")}

    def _fresh(self) -> dict[str, Any]:
        """What today's exporter writes for this block, in its order."""
        return {f.metadata.get("key", f.name): getattr(self, f.name) for f in fields(self)
                if f.name not in ("extra", "keys") and not (f.metadata.get("optional") and getattr(self, f.name) is None)}

    def has(self, key: str) -> bool:
        """The block holds `key` (read from a file: the key was there, even as null; built: it is set)."""
        return key in self.keys if self.keys is not None else self._fresh().get(key) is not None

    def to_dict(self) -> dict[str, Any]:
        fresh = {k: _plain(v) for k, v in self._fresh().items()}
        if self.keys is None:
            return {**fresh, **self.extra}
        known = {k: _plain(v) for k, v in self._known().items()}
        out = {k: self.extra[k] if k in self.extra else known[k] for k in self.keys if k in known or k in self.extra}
        out.update((k, v) for k, v in fresh.items() if k not in out and v is not None)  # set after loading
        return out


def _plain(v: Any) -> Any:
    # a block, or a contract type of another module with its own to_dict (RerankServing)
    return v.to_dict() if hasattr(v, "to_dict") else v


def integer(d: dict[str, Any], key: str, where: str, minimum: int | None = None) -> int | None:
    """d[key] as an int (None when absent or null); BlockError for a bool, a float, a string."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        raise BlockError(f"{where}.{key}", f"must be an integer{'' if minimum is None else f' >= {minimum}'}, "
                                           f"got {v!r}")
    return v


def number(d: dict[str, Any], key: str, where: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BlockError(f"{where}.{key}", f"must be a number, got {v!r:.80}")
    return float(v) if not isinstance(v, int) else v


def obj(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """d[key] as a JSON object; {} when absent (an older manifest)."""
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise BlockError(f"{where}.{key}", f"must be a JSON object, got {v!r:.80}")
    return v


# --- the blocks, top to bottom of a manifest ---


@dataclass(frozen=True)
class Data(Block):
    """`data`: the data set a version was built on."""

    spec: str | None = None
    name: str | None = None
    fingerprint: str | None = None
    num_users: int | None = None
    num_items: int | None = None
    num_interactions: int | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "data") -> Data:
        return cls._read(d, where)


@dataclass(frozen=True)
class Dims(Block):
    """`dims`: retrieval D, M launchers, history length L; pre-rank item heads (G, d) and user heads
    (layers, H, d); the re-rank item feature width F (with a re-ranker)."""

    retrieval_dim: int | None = None
    num_launchers: int | None = None
    maxlen: int | None = None
    prerank_item_heads: list[int] | None = None
    prerank_user_heads: list[int] | None = None
    rerank_item_dim: int | None = optional()

    @classmethod
    def from_dict(cls, d: Any, where: str = "dims") -> Dims:
        if not isinstance(d, dict):
            return cls._read(d, where)
        heads = d.get("prerank_item_heads")
        if heads is not None and (not isinstance(heads, list | tuple) or len(heads) != 2):
            raise BlockError(f"{where}.prerank_item_heads", f"must be [G, d], got {heads!r}")
        return cls._read(d, where, **{k: integer(d, k, where, 1)
                                      for k in ("retrieval_dim", "num_launchers", "maxlen", "rerank_item_dim")})


@dataclass(frozen=True)
class Files(Block):
    """`files`: the file of each role, a plain name inside the version folder (layout.py spells them)."""

    catalog: str | None = None
    retrieval_onnx: str | None = None
    items: str | None = None
    index: str | None = None
    prerank_user_onnx: str | None = None
    prerank_items: str | None = None
    prerank_features: str | None = None
    retrieval_onnx_data: str | None = optional()
    item2item: str | None = optional()
    pair_items: str | None = optional()
    rerank_onnx: str | None = optional()
    rerank_items: str | None = optional()

    @classmethod
    def from_dict(cls, d: Any, where: str = "files") -> Files:
        # each name is checked where the manifest says it is needed (manifest.py)
        return cls._read(d, where)

    def name(self, role: str) -> str:
        """The file name of `role` (a checked manifest has it whenever it is needed)."""
        value = self._known().get(role)
        if not isinstance(value, str):
            raise BlockError(f"files.{role}", "is missing")
        return value


@dataclass(frozen=True)
class Catalog(Block):
    """`catalog`: what the catalog arrays hold; reindex adds what changed (base ... changed_ids)."""

    popularity: str | None = optional()
    trained_items: int | None = optional()
    cold_start: dict[str, Any] | None = optional()
    base: str | None = optional()
    catalog_file: str | None = optional()
    pending_backend: str | None = optional()
    pending_applied: int | None = optional()
    pending_rejected: list[dict[str, str]] | None = optional()
    added: int | None = optional()
    changed: int | None = optional()
    added_ids: list[str] | None = optional()
    changed_ids: list[str] | None = optional()
    max_popularity: int | None = optional()

    @classmethod
    def from_dict(cls, d: Any, where: str = "catalog") -> Catalog:
        return cls._read(d, where)

    @property
    def cold_start_items(self) -> int | None:
        """Items whose retrieval row the cold-start rule gave (reindex)."""
        return None if self.cold_start is None else self.cold_start.get("items")

    def _fresh(self) -> dict[str, Any]:
        out = super()._fresh()
        if self.base is not None:  # a reindex records every field of what it applied, None included
            out.setdefault("catalog_file", None)
            order = [f.name for f in fields(self)]
            out = dict(sorted(out.items(), key=lambda kv: order.index(kv[0])))
        return out


@dataclass(frozen=True)
class Retrieval(Block):
    """`retrieval`: the encoder (model, config, training metrics, ONNX parity, graph signature)."""

    source: str | None = None
    model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    parity_max_abs_diff: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    catalog_metrics: dict[str, float] | None = optional()  # reindex's gate: NDCG@10 over the grown catalog

    @classmethod
    def from_dict(cls, d: Any, where: str = "retrieval") -> Retrieval:
        if not isinstance(d, dict):
            return cls._read(d, where)
        return cls._read(d, where, config=obj(d, "config", where), metrics=obj(d, "metrics", where),
                         inputs=obj(d, "inputs", where), outputs=obj(d, "outputs", where))


@dataclass(frozen=True)
class Index(Block):
    """`index`: `params` as service.index.index_params reads them back from the index (kind,
    factory, search parameters, ...), then the recall measured against exact search."""

    params: dict[str, Any] = field(default_factory=dict)
    recall_k: str | None = None  # "recall@100"; the recall is also written under this key
    recall: float | None = None
    file: str | None = None
    min_recall: float | None = None
    queries: int | None = None
    nprobe_tuned: dict[str, int] | None = optional()
    recall_at_k: float | None = None  # the value under the key recall_k names

    _TAIL = ("file", "min_recall", "recall_k", "recall", "queries", "nprobe_tuned")

    @classmethod
    def from_dict(cls, d: Any, where: str = "index") -> Index:
        if not isinstance(d, dict):
            raise BlockError(where, f"must be a JSON object, got {d!r:.80}")
        rk = d.get("recall_k")
        named = rk if isinstance(rk, str) and rk in d else None
        params = {k: v for k, v in d.items() if k not in cls._TAIL and k != named}
        return cls(params, rk, d.get("recall"), d.get("file"), d.get("min_recall"), d.get("queries"),
                   d.get("nprobe_tuned"), d[named] if named else None, keys=tuple(d))

    def _known(self) -> dict[str, Any]:
        out = {**self.params, **{k: getattr(self, k) for k in self._TAIL}}
        if self.recall_k is not None:
            out[self.recall_k] = self.recall_at_k
        return out

    def _fresh(self) -> dict[str, Any]:
        tail = {k: getattr(self, k) for k in self._TAIL if not (k == "nprobe_tuned" and self.nprobe_tuned is None)}
        return {**self.params, **({self.recall_k: self.recall_at_k} if self.recall_k else {}), **tail}

    @property
    def kind(self) -> str | None:
        return self.params.get("kind")

    @property
    def ntotal(self) -> int | None:
        return self.params.get("ntotal")

    def search_settings(self) -> dict[str, Any]:
        """What service.index.load_index checks and applies (factory, search_params, nprobe, ef_search)."""
        return dict(self.params)
