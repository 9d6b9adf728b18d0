"""The manifest blocks of the ranking stages and of the publish gate: prerank (+ its serving
manifest and retrieval prior), rerank (+ its serving manifest), item2item, serving (+ its
baselines), checks.
The base class and the item-side blocks: service/contract/blocks.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.contract.blocks import Block, BlockError, integer, number, obj, optional
from service.contract.pair_features import PairPrior
from service.contract.rerank_inputs import RerankServing


@dataclass(frozen=True)
class RetrievalPrior(Block):
    """The pre-ranker's retrieval prior (models/cascade.py): score = tower_weight * tower +
    weight * fused retrieval score + launcher_bias[launcher]."""

    tower_weight: float | None = None  # absent in older versions: 1.0
    weight: float = 0.0
    launcher_bias: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, where: str = "retrieval_prior") -> RetrievalPrior:
        if not isinstance(d, dict):
            return cls._read(d, where)
        weight, bias = number(d, "weight", where), d.get("launcher_bias")
        if weight is None:
            raise BlockError(f"{where}.weight", "is missing")
        if not isinstance(bias, list) or not bias:
            raise BlockError(f"{where}.launcher_bias", f"must be a non-empty list, got {bias!r:.80}")
        return cls._read(d, where, tower_weight=number(d, "tower_weight", where), weight=weight)

    def _fresh(self) -> dict[str, Any]:
        return {**({} if self.tower_weight is None else {"tower_weight": self.tower_weight}),
                "weight": self.weight, "launcher_bias": self.launcher_bias}


@dataclass(frozen=True)
class PrerankServing(Block):
    """`prerank.serving`: the pre-rank serving manifest training writes (PRERANK_MANIFEST)."""

    model: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # user_heads: [B, layers, H, d, dtype]
    items: dict[str, Any] = field(default_factory=dict)
    features: str | None = None
    score: str | None = None
    retrieval_prior: RetrievalPrior | None = optional()
    pair_prior: PairPrior | None = optional()  # the learned prior over the pair features; absent before them

    @classmethod
    def from_dict(cls, d: Any, where: str = "prerank.serving") -> PrerankServing:
        if not isinstance(d, dict):
            return cls._read(d, where)
        prior, pair = d.get("retrieval_prior"), d.get("pair_prior")
        pair_prior = None if pair is None else PairPrior.from_dict(pair, f"{where}.pair_prior")
        if prior or prior is None:
            return cls._read(d, where, inputs=obj(d, "inputs", where), outputs=obj(d, "outputs", where),
                             items=obj(d, "items", where), retrieval_prior=None if prior is None else
                             RetrievalPrior.from_dict(prior, f"{where}.retrieval_prior"), pair_prior=pair_prior)
        # an empty prior ({} / false) means none; kept as written
        block = cls._read({k: v for k, v in d.items() if k != "retrieval_prior"}, where, pair_prior=pair_prior)
        return PrerankServing(**{**block.__dict__, "extra": {**block.extra, "retrieval_prior": prior},
                                 "keys": tuple(d)})

    @property
    def user_heads(self) -> list[Any]:
        """The user-heads output signature [B, layers, H, d, dtype]."""
        return list(self.outputs.get("user_heads") or [])


@dataclass(frozen=True)
class Prerank(Block):
    """`prerank`: the pre-ranker (IntTower) and its serving manifest."""

    source: str | None = None
    model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None
    train: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    parity_max_abs_diff: float | None = None
    serving: PrerankServing | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "prerank") -> Prerank:
        if not isinstance(d, dict):
            return cls._read(d, where)
        serving = d.get("serving")
        return cls._read(d, where, config=obj(d, "config", where), metrics=obj(d, "metrics", where),
                         serving=None if serving is None else PrerankServing.from_dict(serving, f"{where}.serving"))


@dataclass(frozen=True)
class Rerank(Block):
    """`rerank`: the re-ranker (PRM); `config` is its model config (max_len L, num_scores S)."""

    source: str | None = None
    model: str | None = None
    train: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    serving: RerankServing | None = None  # rerank_manifest.json (service/contract/rerank_inputs.py)
    parity_max_abs_diff: float | None = optional()
    config: dict[str, Any] | None = optional()

    @classmethod
    def from_dict(cls, d: Any, where: str = "rerank") -> Rerank:
        if not isinstance(d, dict):
            return cls._read(d, where)
        config = obj(d, "config", where)
        integer(config, "max_len", f"{where}.config", 1)
        if config.get("max_len") is None:
            raise BlockError(f"{where}.config.max_len", "is missing")
        integer(config, "num_scores", f"{where}.config", 1)
        return cls._read(d, where, metrics=obj(d, "metrics", where),
                         serving=RerankServing.from_dict(d.get("serving"), f"{where}.serving"),
                         config=d.get("config"))

    @property
    def max_len(self) -> int:
        """L: the longest list the re-ranker takes."""
        return int((self.config or {})["max_len"])

    @property
    def num_scores(self) -> int:
        """S: 1 (the pre-rank score) or 2 (+ the fused retrieval score)."""
        return int((self.config or {}).get("num_scores", 1))


@dataclass(frozen=True)
class Item2Item(Block):
    """`item2item`: the item-to-item route's table (its settings, how it was built) and the
    request-time settings (`serving`: recent, decay, candidates, beta), chosen at publish on the
    version's validation users (`tuning`: the grid, each setting tried with its NDCG@10, the users
    and seed; training/publish/route_tuning.py; absent in older versions)."""

    file: str | None = None
    neighbours: int | None = None
    window: int | None = None
    alpha: float | None = None
    rule: str | None = None
    interactions: int | None = None
    events: int | None = None
    items_with_neighbours: int | None = None
    serving: dict[str, float] | None = None
    tuning: dict[str, Any] | None = optional()

    @classmethod
    def from_dict(cls, d: Any, where: str = "item2item") -> Item2Item:
        if not isinstance(d, dict):
            return cls._read(d, where)
        return cls._read(d, where, neighbours=integer(d, "neighbours", where), window=integer(d, "window", where),
                         alpha=number(d, "alpha", where))


def flag(d: dict[str, Any], key: str, where: str) -> bool | None:
    """d[key] as a bool (None when absent); BlockError for anything else (0, "false")."""
    v = d.get(key)
    if v is not None and not isinstance(v, bool):
        raise BlockError(f"{where}.{key}", f"must be true or false, got {v!r:.80}")
    return v


@dataclass(frozen=True)
class Baselines(Block):
    """`serving.baselines`: the trivial baselines on the gate's users (training/eval/gate_baselines.py)
    and the verdict. rows: per baseline HR@10, NDCG@10, Coverage@10; beats: the served cut's
    NDCG@10 minus the best baseline's is more than its paired SE; allowed_below: published
    anyway (--allow-below-baseline)."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    best: str | None = None
    served_cut: str | None = None
    served_minus_best: float | None = None
    paired_se: float | None = None
    rule: str | None = None
    beats: bool = False
    allowed_below: bool = False

    @classmethod
    def from_dict(cls, d: Any, where: str = "serving.baselines") -> Baselines:
        if not isinstance(d, dict):
            return cls._read(d, where)
        beats, allowed = flag(d, "beats", where), flag(d, "allowed_below", where)
        return cls._read(d, where, rows=obj(d, "rows", where), served_minus_best=number(d, "served_minus_best", where),
                         paired_se=number(d, "paired_se", where), beats=bool(beats), allowed_below=bool(allowed))


@dataclass(frozen=True)
class Serving(Block):
    """`serving`: what the publish gate measured on the served path and which stages it serves.

    rule: how a stage was switched off ("paired-se", "absolute" with `tolerance`, "off"; absent
    in versions published before the paired-SE rule, which used the absolute `tolerance`)."""

    split: str | None = None
    users: int | None = None
    seed: int | None = None
    metric: str | None = None
    tolerance: float | None = None
    settings: dict[str, Any] | None = None
    cuts: dict[str, dict[str, float]] = field(default_factory=dict)
    deltas: dict[str, Any] | None = None
    stages: list[str] | None = None  # a non-empty prefix of STAGES (checked in manifest.py)
    switched_off: list[str] | None = None
    reason: str | None = None
    rule: str | None = optional()
    baselines: Baselines | None = optional()  # absent in versions published before the baseline gate

    @classmethod
    def from_dict(cls, d: Any, where: str = "serving") -> Serving:
        if not isinstance(d, dict):
            raise BlockError(where, f"must be an object, got {type(d).__name__}")
        bl = d.get("baselines")
        return cls._read(d, where, cuts=obj(d, "cuts", where),
                         baselines=None if bl is None else Baselines.from_dict(bl, f"{where}.baselines"))

    def served_metric(self, metric: str) -> float | None:
        """`metric` (NDCG@10) of the last served cut; None when not recorded."""
        return self.cuts.get(self.stages[-1], {}).get(metric) if self.stages else None


@dataclass(frozen=True)
class RegressionCheck(Block):
    """`checks.regression`: the offline-metric gate against the live version. Across data sets
    (a retrain) both versions are replayed on this version's validation users: `split`, `users`,
    the paired SE of mean(new - live) per-user NDCG@10 and the `rule` that refuses."""

    metric: str | None = None
    max_regression: float | None = None
    live_version: str | None = None
    compared: str | None = optional()
    result: str | None = optional()
    live: float | None = optional()
    new: float | None = optional()
    users: int | None = optional()
    split: str | None = optional()
    paired_se: float | None = optional()
    rule: str | None = optional()

    @classmethod
    def from_dict(cls, d: Any, where: str = "checks.regression") -> RegressionCheck:
        return cls._read(d, where)


@dataclass(frozen=True)
class Checks(Block):
    """`checks`: the thresholds a version passed."""

    min_recall: float | None = None
    regression: RegressionCheck = field(default_factory=RegressionCheck)

    @classmethod
    def from_dict(cls, d: Any, where: str = "checks") -> Checks:
        if not isinstance(d, dict):
            return cls._read(d, where)
        return cls._read(d, where, regression=RegressionCheck.from_dict(obj(d, "regression", where)))
