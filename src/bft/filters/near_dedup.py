"""Near-duplicate detection: MinHash LSH over word shingles, streaming and sharded.

Each document's MinHash signature (datasketch) is cut into ``b`` bands of ``r`` values,
the banding datasketch's ``MinHashLSH`` picks for the threshold; two documents whose
signatures agree on a whole band are near-duplicates (what ``MinHashLSH.query`` answers).
Every band bucket is owned by one of N ``NearDupShard`` actors (by a hash of the bucket),
which records the first document to claim it.

A batch claims its documents' buckets shard by shard, always in the same shard order, and
a document that finds one of its buckets owned by another stops there: of two twins in
flight at once, the one that wins their first shared bucket (in that order) is kept and
the other names it. A losing document gives back the buckets it claimed on earlier
shards, and a document of the same batch that was named as its twin asks again. (Across
two tasks in flight at once, a document can still be named after a twin that loses a
moment later on another shard; it stays dropped, with that twin's id.)

:func:`similar_pairs` is the same signature and banding run in memory, with each
candidate pair checked exactly; the report's near-duplicate figure uses it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from functools import lru_cache
from typing import Any, Callable, Iterable

import numpy as np
import ray

from bft.config import NearDedupConfig
from bft.filters.dedup import normalize
from bft.schema import identity, row_key


def word_shingles(text: str, n: int) -> set[str]:
    """Runs of ``n`` words of the normalized text (the whole text when it is shorter)."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=8)
def banding(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """``(bands, rows per band)`` minimising datasketch's weighted error for ``threshold``."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
    return lsh.b, lsh.r


# datasketch's permutation scheme, named so a new default cannot change signatures (and so
# what a resumed run's documents are compared with) under a run.
SCHEME = "affine32"


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> Any:
    """The permutations of a seed, computed once (datasketch derives them per MinHash)."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def signature(shingles: Iterable[str], num_perm: int, seed: int) -> np.ndarray:
    from datasketch import MinHash

    minhash = MinHash(num_perm=num_perm, seed=seed, permutations=_permutations(num_perm, seed), scheme=SCHEME)
    minhash.update_batch([s.encode("utf-8", "surrogatepass") for s in shingles])
    return minhash.hashvalues


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One 12-byte key per band (band number and its values, hashed)."""
    return [hashlib.blake2b(bytes([band]) + sig[band * rows:(band + 1) * rows].tobytes(), digest_size=12).digest()
            for band in range(bands)]


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def similar_pairs(shingle_sets: list[set[str]], threshold: float, num_perm: int = 64, seed: int = 1,
                  jaccard: Callable[[set, set], float] | None = None) -> list[tuple[float, int, int]]:
    """``(similarity, i, j)`` for every pair whose exact Jaccard reaches ``threshold``,
    found through LSH candidates (banding weighted towards recall: candidates are checked)."""
    bands, rows = banding(threshold, num_perm, (0.1, 0.9))
    buckets: dict[bytes, list[int]] = defaultdict(list)
    for i, shingles in enumerate(shingle_sets):
        if shingles:
            for key in band_keys(signature(shingles, num_perm, seed), bands, rows):
                buckets[key].append(i)
    candidates = {(x, y) for members in buckets.values() if len(members) > 1
                  for k, x in enumerate(members) for y in members[k + 1:]}
    pairs = [((jaccard or exact_jaccard)(shingle_sets[x], shingle_sets[y]), x, y) for x, y in candidates]
    return sorted((p for p in pairs if p[0] >= threshold), key=lambda p: (-p[0], p[1], p[2]))


@ray.remote(num_cpus=0)
class NearDupShard:
    """The owners of one shard's band buckets (12 bytes plus two short strings each)."""

    def __init__(self) -> None:
        self.owner: dict[bytes, tuple[str, str]] = {}

    def claim(self, items: list[tuple[list[bytes], str, str]]) -> list[str | None]:
        """For each ``(bucket keys, occurrence key, id)``: ``None`` when the occurrence owns
        all the keys (now, or from an earlier claim: a retried task), else the id of the
        first other owner found; the keys are claimed only when none is taken."""
        out: list[str | None] = []
        for keys, key, doc_id in items:
            taken = next((o for o in (self.owner.get(k) for k in keys) if o is not None and o[0] != key), None)
            if taken is None:
                for k in keys:
                    self.owner.setdefault(k, (key, doc_id))
            out.append(None if taken is None else taken[1])
        return out

    def release(self, items: list[tuple[list[bytes], str]]) -> None:
        """Give back the keys an occurrence owns (it lost on a later shard)."""
        for keys, key in items:
            for k in keys:
                if self.owner.get(k, ("",))[0] == key:
                    del self.owner[k]


class NearDeduplicator:
    """Client side: signatures in the filter task, buckets routed to their shards. Picklable."""

    def __init__(self, shards: list[ray.actor.ActorHandle], cfg: NearDedupConfig):
        self.shards = shards
        self.cfg = cfg
        self.bands, self.rows = banding(cfg.threshold, cfg.num_perm)

    @classmethod
    def start(cls, cfg: NearDedupConfig) -> NearDeduplicator:
        return cls([NearDupShard.remote() for _ in range(cfg.shards)], cfg)

    def _by_shard(self, text: str) -> dict[int, list[bytes]]:
        by_shard: dict[int, list[bytes]] = defaultdict(list)
        shingles = word_shingles(text, self.cfg.shingle_words)
        for k in band_keys(signature(shingles, self.cfg.num_perm, self.cfg.seed), self.bands, self.rows):
            by_shard[int.from_bytes(k[:8], "big") % len(self.shards)].append(k)
        return by_shard

    def near_duplicates_of(self, docs: list[dict]) -> list[str | None]:
        """For each doc: ``None`` if kept, else the id of the kept near-duplicate."""
        buckets = [self._by_shard(doc["text"]) for doc in docs]
        keys = [row_key(*identity(doc)) for doc in docs]
        result: list[str | None] = [None] * len(docs)
        claimed: dict[int, list[int]] = defaultdict(list)  # shard -> docs that claimed there
        for s, shard in enumerate(self.shards):  # the fixed order that settles races
            asking = [i for i in range(len(docs)) if result[i] is None and buckets[i].get(s)]
            if not asking:
                continue
            answers = ray.get(shard.claim.remote([(buckets[i][s], keys[i], docs[i]["id"]) for i in asking]))
            for i, owner in zip(asking, answers):
                if owner is None:
                    claimed[s].append(i)
                else:
                    result[i] = owner
        releases = {s: [(buckets[i][s], keys[i]) for i in idx if result[i] is not None] for s, idx in claimed.items()}
        ray.get([self.shards[s].release.remote(items) for s, items in releases.items() if items])
        # A document of this batch named as the twin of one that then lost on a later shard
        # (and gave its buckets back) asks again: the answer is then what it would be with
        # one shard, so the shard count never changes what is kept.
        lost = {docs[i]["id"] for i in range(len(docs)) if result[i] is not None}
        kept = {docs[i]["id"] for i in range(len(docs)) if result[i] is None}
        again = [i for i in range(len(docs)) if result[i] in lost and result[i] not in kept]
        if again and len(again) < len(docs):
            for i, owner in zip(again, self.near_duplicates_of([docs[i] for i in again])):
                result[i] = owner
        return result

    def remember(self, rows: list[dict]) -> None:
        """Register documents an earlier attempt kept (resume), as exact dedup does."""
        if rows:
            self.near_duplicates_of(rows)

    def stop(self) -> None:
        for shard in self.shards:
            ray.kill(shard)
