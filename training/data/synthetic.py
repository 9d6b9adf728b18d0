"""Deterministic synthetic interaction logs with signal for every model in the pipeline.

What each stage can learn from it:
- sequence models: each item has a few fixed successors (Markov transitions), and users draw
  from a small set of long-term interests, so both the last item and the older history matter;
- feature models: a user's interests depend on their age bucket and gender; an item's
  category, tags and price are observable; ratings depend on how well the item's category
  matches the user's interests plus a per-item quality term;
- re-rankers: the rating a user gives depends on the match, so lists ordered by a pre-ranker
  still leave room to reorder.

Everything is vectorised over users, so 100k users x 20k items takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from training.data.dataset import DataError, Dataset, FeatureTable, RawLog

AGE_BUCKETS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
GENDERS = ["F", "M"]
NUM_OCCUPATIONS = 21


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 2000
    items: int = 1000
    categories: int = 20
    tags: int = 60
    mean_len: float = 25.0
    min_len: int = 5
    max_len: int = 200
    successors: int = 4
    markov: float = 0.5  # probability the next item is a successor of the previous one
    explore: float = 0.1  # probability of an item outside the user's interests
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 2:
            raise ValueError(f"synthetic needs users >= 1 and items >= 2, got {self.users}, {self.items}")
        if not 1 <= self.categories <= self.items:
            raise ValueError(f"synthetic categories must be in 1..items, got {self.categories}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"synthetic needs 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        for name in ("markov", "explore"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic {name} must be in [0, 1], got {getattr(self, name)}")


def parse_synthetic_spec(options: str) -> SyntheticConfig:
    """'users=100,items=50,seed=3' -> SyntheticConfig; unknown keys are errors."""
    known = {f.name: f.type for f in fields(SyntheticConfig)}
    kwargs: dict[str, int | float] = {}
    for part in filter(None, options.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise DataError(
                f"synthetic: bad option '{part}' (known: {', '.join(sorted(known))}, as key=value)"
            )
        try:
            kwargs[key] = float(value) if known[key] == "float" else int(value)
        except ValueError:
            raise DataError(f"synthetic: option {key} needs a number, got '{value}'") from None
    try:
        return SyntheticConfig(**kwargs)  # type: ignore[arg-type]
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _by_popularity_sampler(category: np.ndarray, popularity: np.ndarray, num_categories: int):
    """Returns sample(cats, rng) -> items drawn by popularity within each given category."""
    order = np.lexsort((np.arange(category.size), category))  # items grouped by category
    cat_sorted = category[order]
    w = popularity[order]
    totals = np.bincount(cat_sorted, weights=w, minlength=num_categories)
    within = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(totals)[:-1]])[cat_sorted]
    key = cat_sorted + within / totals[cat_sorted]  # c + cumulative prob in (c, c + 1]

    def sample(cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pos = np.searchsorted(key, cats + rng.random(cats.size) * (1 - 1e-12), side="right")
        pos = np.minimum(pos, order.size - 1)
        return order[pos]

    return sample


@dataclass(frozen=True)
class SyntheticTruth:
    """The generator's hidden state: what a simulated user really prefers (0-based item and user
    indices; the data set's external ids are their decimal strings).

    item_category (N,), item_popularity (N,) (the within-category sampling weight), successors
    (N, S), affinity (U, C): each user's interest weights over categories (rows sum to 1)."""

    config: SyntheticConfig
    item_category: np.ndarray
    item_popularity: np.ndarray
    successors: np.ndarray
    affinity: np.ndarray

    def next_item_probs(self, user: int, last_item: int | None) -> np.ndarray:
        """(N,) the generator's own distribution of the user's next item after `last_item`
        (before the repeat filter): successors with probability `markov`, else an interest (or,
        with probability `explore`, any category) and an item by popularity within it."""
        cfg, cat, pop = self.config, self.item_category, self.item_popularity
        cat_total = np.bincount(cat, weights=pop, minlength=cfg.categories)
        in_cat = pop / cat_total[cat]  # P(item | its category)
        cat_p = (1.0 - cfg.explore) * self.affinity[user] + cfg.explore / cfg.categories
        probs = cat_p[cat] * in_cat
        if last_item is not None:
            succ = np.bincount(self.successors[last_item], minlength=cat.size) / self.successors.shape[1]
            probs = (1.0 - cfg.markov) * probs + cfg.markov * succ
        return probs


def generate(cfg: SyntheticConfig) -> Dataset:
    return synthetic_log(cfg).build()


def synthetic_log(cfg: SyntheticConfig) -> RawLog:
    """The data set as read (before ids are mapped)."""
    return synthetic_world(cfg)[0]


def generate_world(cfg: SyntheticConfig) -> tuple[Dataset, SyntheticTruth]:
    """The data set and the ground truth it was drawn from (for simulated users)."""
    raw, truth = synthetic_world(cfg)
    return raw.build(), truth


def synthetic_world(cfg: SyntheticConfig) -> tuple[RawLog, SyntheticTruth]:
    """The generator: the data set as read and the hidden state it was drawn from."""
    rng = np.random.default_rng(cfg.seed)
    N, U, C = cfg.items, cfg.users, cfg.categories

    # --- items (0-based here; the dataset maps them to 1..N) ---
    item_cat = rng.permutation(np.arange(N) % C)
    popularity = rng.pareto(1.1, size=N) + 1.0
    quality = rng.normal(0.0, 0.5, size=N)
    cat_price = rng.uniform(2.0, 5.0, size=C)
    price = np.exp(cat_price[item_cat] + rng.normal(0.0, 0.3, size=N)).astype(np.float32)
    tag_pool = rng.integers(0, cfg.tags, size=(C, 5))
    n_tags = rng.integers(1, 4, size=N)
    tags = tag_pool[item_cat[:, None], rng.integers(0, 5, size=(N, 3))] + 1
    tags[np.arange(3)[None, :] >= n_tags[:, None]] = 0
    sample_in_cat = _by_popularity_sampler(item_cat, popularity, C)
    succ = np.empty((N, cfg.successors), dtype=np.int64)
    succ[:, :-1] = sample_in_cat(np.repeat(item_cat, cfg.successors - 1), rng).reshape(N, -1)
    succ[:, -1] = sample_in_cat((item_cat + 1) % C, rng)

    # --- users: interests depend on age bucket and gender ---
    age = rng.integers(0, len(AGE_BUCKETS), size=U)
    gender = rng.integers(0, 2, size=U)
    occupation = rng.integers(0, NUM_OCCUPATIONS, size=U)
    pref_age = rng.dirichlet(np.full(C, 0.3), size=len(AGE_BUCKETS))
    pref_gender = rng.dirichlet(np.full(C, 0.3), size=2)
    prior = 0.5 * pref_age[age] + 0.3 * pref_gender[gender] + 0.2 / C  # (U, C)
    k_max = min(4, C)
    # Gumbel top-k = sampling interests without replacement from the prior
    gumbel = np.log(prior) - np.log(-np.log(rng.random((U, C))))
    interests = np.argsort(-gumbel, axis=1)[:, :k_max]  # (U, K)
    n_int = rng.integers(min(2, k_max), k_max + 1, size=U)
    weights = rng.dirichlet(np.ones(k_max), size=U)
    weights[np.arange(k_max)[None, :] >= n_int[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    cum_w = np.cumsum(weights, axis=1)
    affinity = np.zeros((U, C))
    np.put_along_axis(affinity, interests, weights, axis=1)

    # --- sequences, one step for all active users at a time ---
    lengths = np.clip(
        np.round(rng.lognormal(np.log(cfg.mean_len), 0.6, size=U)), cfg.min_len, cfg.max_len
    ).astype(np.int64)
    T = int(lengths.max())
    seq = np.full((U, T), -1, dtype=np.int64)
    for t in range(T):
        active = np.flatnonzero(lengths > t)
        n = active.size
        pick = (rng.random(n)[:, None] < cum_w[active]).argmax(axis=1)
        cats = interests[active, pick]
        explore = rng.random(n) < cfg.explore
        cats[explore] = rng.integers(0, C, size=int(explore.sum()))
        nxt = sample_in_cat(cats, rng)
        if t > 0:
            follow = rng.random(n) < cfg.markov
            prev = seq[active[follow], t - 1]
            nxt[follow] = succ[prev, rng.integers(0, cfg.successors, size=prev.size)]
        seq[active, t] = nxt

    user_idx = np.repeat(np.arange(U), T).reshape(U, T)
    step = np.broadcast_to(np.arange(T), (U, T))
    valid = seq >= 0
    u_flat, i_flat, t_flat = user_idx[valid], seq[valid], step[valid]
    # drop repeats of a (user, item) pair, keeping the first
    _, first = np.unique(u_flat * N + i_flat, return_index=True)
    keep = np.sort(first)
    u_flat, i_flat, t_flat = u_flat[keep], i_flat[keep], t_flat[keep]

    start = rng.integers(1_600_000_000, 1_700_000_000, size=U)
    timestamps = start[u_flat] + t_flat * 3600 + rng.integers(0, 3600, size=u_flat.size)
    match = affinity[u_flat, item_cat[i_flat]]
    raw = 1.8 + 5.0 * match + quality[i_flat] + rng.normal(0.0, 0.7, size=u_flat.size)
    ratings = np.clip(np.round(raw), 1, 5).astype(np.float32)

    # log order: interleave users by time, as a real log would be
    log_order = np.argsort(timestamps, kind="stable")

    user_table = FeatureTable(
        categorical={"age": age + 1, "gender": gender + 1, "occupation": occupation + 1},
        vocab={
            "age": AGE_BUCKETS,
            "gender": GENDERS,
            "occupation": [f"occ{j}" for j in range(NUM_OCCUPATIONS)],
        },
    )
    item_table = FeatureTable(
        categorical={"category": item_cat + 1},
        multi={"tags": tags},
        numeric={"price": price},
        vocab={"category": [f"cat{c}" for c in range(C)], "tags": [f"tag{j}" for j in range(cfg.tags)]},
    )
    truth = SyntheticTruth(cfg, item_cat, popularity, succ, affinity)
    return RawLog(
        f"synthetic(seed={cfg.seed},users={U},items={N})",
        u_flat[log_order],  # integer ids: external ids are their decimal strings
        i_flat[log_order],
        timestamps[log_order],
        ratings[log_order],
        user_table=([str(j) for j in range(U)], user_table),
        item_table=([str(j) for j in range(N)], item_table),
    ), truth
