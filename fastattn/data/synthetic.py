"""A synthetic data set with learnable structure, so the project runs (and models can be compared)
without any downloaded file.

Generative story (all draws from one numpy Generator seeded by `config.seed`):
- items 1..N are spread evenly over C classes (the "category" feature, one value per item); each
  class has a small pool of preferred tags, and every item gets `attrs_per_item` distinct tags,
  mostly from its class's pool (the "tags" feature, multi-valued); each class belongs to a domain
  and its items mostly share it (`item_domain_noise` of them get a random domain);
- classes follow a sparse random Markov chain: each class has `transitions_per_class` successor
  classes with Dirichlet weights;
- every user has a preferred class; each step moves to a successor of the current class (with
  probability 1 - user_pref - noise), to the preferred class (user_pref) or to a uniformly random
  class (noise), then picks an item of that class with Zipf-like popularity (rank^-zipf, ranks
  random within each class); unless `allow_repeats`, an item the user already has is redrawn
  (within the class, then with a new class, finally uniformly), so no sequence repeats an item;
- sequence lengths are uniform in [min_len, max_len].

A model that reads the order of the sequence and the attributes therefore beats popularity: the
next class is largely predictable from the current one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .dataset import ItemFeature, SequenceDataset

__all__ = ["SyntheticConfig", "make_synthetic"]

_MAX_CELLS = 10**8   # largest array the generator may allocate (int64: 800 MB)
_MAX_CLASSES = 4096  # the class transition matrix is (num_attributes, num_attributes)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of `make_synthetic` (see the module docstring for their role)."""

    num_users: int = 2000
    num_items: int = 500
    num_attributes: int = 20          # classes: the "category" vocabulary (without padding)
    num_tags: int = 60                # the "tags" vocabulary (without padding)
    num_domains: int = 2
    min_len: int = 5
    max_len: int = 30
    attrs_per_item: tuple[int, int] = (1, 3)   # tags per item, inclusive range
    tags_per_class: int = 4           # size of each class's preferred tag pool
    tag_noise: float = 0.2            # probability that a tag is uniform instead of from the pool
    transitions_per_class: int = 3    # successors of each class in the Markov chain
    user_pref: float = 0.15           # probability of jumping to the user's preferred class
    noise: float = 0.05               # probability of a uniformly random next class
    zipf: float = 1.1                 # within-class popularity exponent
    item_domain_noise: float = 0.1    # share of items whose domain is random instead of their class's
    allow_repeats: bool = False       # False: no item occurs twice in a user's sequence
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.attrs_per_item
        checks = [
            (self.num_users >= 1, "num_users >= 1"),
            (self.num_attributes >= 1, "num_attributes >= 1"),
            (self.num_items >= self.num_attributes, "num_items >= num_attributes (every class needs an item)"),
            (self.num_tags >= 1, "num_tags >= 1"),
            (self.num_domains >= 1, "num_domains >= 1"),
            (1 <= self.min_len <= self.max_len, "1 <= min_len <= max_len"),
            (self.allow_repeats or self.max_len <= self.num_items, "max_len <= num_items unless allow_repeats"),
            (1 <= lo <= hi <= self.num_tags, "1 <= attrs_per_item[0] <= attrs_per_item[1] <= num_tags"),
            (1 <= self.tags_per_class, "tags_per_class >= 1"),
            (1 <= self.transitions_per_class <= self.num_attributes,
             "1 <= transitions_per_class <= num_attributes"),
            (0 <= self.user_pref and 0 <= self.noise and self.user_pref + self.noise <= 1,
             "user_pref, noise >= 0 and user_pref + noise <= 1"),
            (0 <= self.tag_noise <= 1 and 0 <= self.item_domain_noise <= 1, "noise shares in [0, 1]"),
            (bool(np.isfinite(self.zipf)), "a finite zipf"),
            (self.seed >= 0, "seed >= 0"),
            # sizes: the generator holds (num_users, max_len), (num_items, attrs_per_item[1]) and
            # (num_attributes, num_attributes) arrays; refuse what would not fit rather than allocate
            (self.num_users * self.max_len <= _MAX_CELLS, f"num_users * max_len <= {_MAX_CELLS:,}"),
            (max(self.num_items * hi, self.num_tags, self.num_domains) <= _MAX_CELLS,
             f"num_items * attrs_per_item[1], num_tags and num_domains <= {_MAX_CELLS:,}"),
            (self.num_attributes <= _MAX_CLASSES, f"num_attributes <= {_MAX_CLASSES:,}"),
        ]
        for ok, rule in checks:
            if not ok:
                raise ValueError(f"SyntheticConfig: need {rule}")


def _sample_rows(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each row of the cumulative distribution cum (n, K), the index drawn by uniform u (n,)."""
    return np.minimum((cum < u[:, None] * cum[:, -1:]).sum(axis=1), cum.shape[1] - 1)


_REDRAWS = 8  # redraws of a repeated item before falling back to a uniformly random one


def _next_class(config: SyntheticConfig, cum_transition: np.ndarray, current: np.ndarray,
                preferred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Next class of each user: a Markov successor of `current`, the user's preferred class
    (probability user_pref) or a uniformly random class (probability noise)."""
    n = len(current)
    follow = _sample_rows(cum_transition[current], rng.random(n))
    r = rng.random(n)
    return np.where(r < config.noise, rng.integers(len(cum_transition), size=n),
                    np.where(r < config.noise + config.user_pref, preferred, follow))


def _item_tags(config: SyntheticConfig, item_class: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, hi) tag ids (1-based), distinct within a row, 0-padded on the right."""
    n, (lo, hi) = len(item_class), config.attrs_per_item
    pool_size = min(config.tags_per_class, config.num_tags)
    pools = np.stack([rng.choice(config.num_tags, size=pool_size, replace=False)
                      for _ in range(config.num_attributes)])
    k = rng.integers(lo, hi + 1, size=n)
    from_pool = pools[item_class[:, None], rng.integers(pool_size, size=(n, hi))]
    uniform = rng.integers(config.num_tags, size=(n, hi))
    tags = np.where(rng.random((n, hi)) < config.tag_noise, uniform, from_pool) + 1
    tags[np.arange(hi)[None, :] >= k[:, None]] = 0
    tags = -np.sort(-tags, axis=1)                      # descending: zeros last
    tags[:, 1:][tags[:, 1:] == tags[:, :-1]] = 0        # drop repeats (adjacent after sorting)
    tags = -np.sort(-tags, axis=1)
    return tags


class _Chain(NamedTuple):
    """What each step of a sequence draws from: the class chain and the items within a class."""

    cum_transition: np.ndarray  # (C, C) float64 cumulative successor weights of each class
    members: np.ndarray         # (C, S) int64 item indices of each class (0-padded), by popularity rank
    cum_pop: np.ndarray         # (C, S) float64 cumulative Zipf weights over members
    item_class: np.ndarray      # (N,) int64 class of each item index
    preferred: np.ndarray       # (U,) int64 preferred class of each user


def _class_chain(config: SyntheticConfig, item_class: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cum_transition, members, cum_pop) of `_Chain`: the sparse Markov chain over classes, then
    within-class Zipf popularity (ranks random within each class)."""
    n_cls = config.num_attributes
    transition = np.zeros((n_cls, n_cls))
    for c in range(n_cls):
        successors = rng.choice(n_cls, size=config.transitions_per_class, replace=False)
        transition[c, successors] = rng.dirichlet(np.ones(config.transitions_per_class))
    members_list = [np.flatnonzero(item_class == c) for c in range(n_cls)]
    width = max(len(m) for m in members_list)
    members = np.zeros((n_cls, width), dtype=np.int64)
    weights = np.zeros((n_cls, width))
    for c, m in enumerate(members_list):
        members[c, :len(m)] = rng.permutation(m)
        weights[c, :len(m)] = 1.0 / np.arange(1, len(m) + 1) ** config.zipf
    return np.cumsum(transition, axis=1), members, np.cumsum(weights, axis=1)


def _draw_items(chain: _Chain, cls: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item index of each class in cls (n,), by within-class popularity."""
    return chain.members[cls, _sample_rows(chain.cum_pop[cls], rng.random(len(cls)))]


def _redraw_repeats(config: SyntheticConfig, chain: _Chain, history: np.ndarray, item: np.ndarray,
                    cls: np.ndarray, prev: np.ndarray, rng: np.random.Generator) -> None:
    """Redraw, in place, each item[u] already in history[u] (U, t): first within the class, then
    with a fresh class (cls updated), finally uniformly among all items.

    Users do not consume an item twice (as in the Amazon 5-core data, and so that the
    history-masked full ranking can reach every target)."""
    for attempt in range(_REDRAWS + 1):
        dup = np.flatnonzero((history == item[:, None]).any(axis=1))
        if dup.size == 0:
            return
        if attempt >= _REDRAWS:
            item[dup] = rng.integers(config.num_items, size=dup.size)
            continue
        if attempt >= _REDRAWS // 2:
            cls[dup] = _next_class(config, chain.cum_transition, prev[dup], chain.preferred[dup], rng)
        item[dup] = _draw_items(chain, cls[dup], rng)
    while True:  # only uniform draws remain: num_items >= max_len guarantees progress
        dup = np.flatnonzero((history == item[:, None]).any(axis=1))
        if dup.size == 0:
            return
        item[dup] = rng.integers(config.num_items, size=dup.size)


def _sequences(config: SyntheticConfig, chain: _Chain, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(U, max(lengths)) int64 item indices, step by step along each user's class chain."""
    n_users, n_cls = config.num_users, config.num_attributes
    steps = int(lengths.max())
    seq = np.zeros((n_users, steps), dtype=np.int64)
    cls = np.where(rng.random(n_users) < 0.5, chain.preferred, rng.integers(n_cls, size=n_users))
    prev = cls
    for t in range(steps):
        if t > 0:
            cls = _next_class(config, chain.cum_transition, prev, chain.preferred, rng)
        item = _draw_items(chain, cls, rng)
        if not config.allow_repeats and t > 0:
            _redraw_repeats(config, chain, seq[:, :t], item, cls, prev, rng)
            cls = chain.item_class[item]
        seq[:, t] = item
        prev = cls
    return seq


def make_synthetic(config: SyntheticConfig = SyntheticConfig()) -> SequenceDataset:
    """Generate the synthetic data set (deterministic given `config`).

    Returns a SequenceDataset named "synthetic" with domains (one per interaction = the item's
    domain) and two features: "category" (N + 1, 1), the primary class 1..C, and "tags"
    (N + 1, attrs_per_item[1]), 1..num_tags, 0-padded.
    """
    rng = np.random.default_rng(config.seed)  # every draw below, in this order, is part of the data set
    n_items, n_cls, n_users = config.num_items, config.num_attributes, config.num_users
    item_class = rng.permutation(np.arange(n_items) % n_cls)
    class_domain = rng.permutation(np.arange(n_cls) % config.num_domains)
    item_domain = np.where(rng.random(n_items) < config.item_domain_noise,
                           rng.integers(config.num_domains, size=n_items), class_domain[item_class])
    tags = _item_tags(config, item_class, rng)
    cum_transition, members, cum_pop = _class_chain(config, item_class, rng)
    chain = _Chain(cum_transition, members, cum_pop, item_class, rng.integers(n_cls, size=n_users))
    lengths = rng.integers(config.min_len, config.max_len + 1, size=n_users)
    seq = _sequences(config, chain, lengths, rng)

    mask = np.arange(seq.shape[1])[None, :] < lengths[:, None]
    flat = seq[mask]                                   # row-major: user by user, in time order
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    category = np.zeros((n_items + 1, 1), dtype=np.int64)
    category[1:, 0] = item_class + 1
    tag_values = np.zeros((n_items + 1, tags.shape[1]), dtype=np.int64)
    tag_values[1:] = tags
    return SequenceDataset(
        name="synthetic", num_items=n_items, indptr=indptr, items=flat + 1,
        domains=item_domain[flat], num_domains=config.num_domains,
        features=(ItemFeature("category", category, n_cls + 1),
                  ItemFeature("tags", tag_values, config.num_tags + 1)),
        user_ids=np.arange(n_users, dtype=np.int64))
