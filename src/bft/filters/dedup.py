"""Exact deduplication on normalized text across the whole input, while streaming.

Documents are hashed in the filter tasks; each hash is owned by one of N
``DedupShard`` actors (hash-range sharding), which remembers what it has seen and
answers "first time?" for a batch of hashes. The first copy to arrive is kept; later
copies are dropped as ``duplicate`` with the id of the kept one in the detail.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import ray

from bft.schema import identity, row_key

WHITESPACE_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Fold Unicode form, case and whitespace so trivially different copies collide."""
    return WHITESPACE_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


@ray.remote(num_cpus=0)
class DedupShard:
    """Remembers the hashes of one shard (16 bytes plus two short strings per document)."""

    def __init__(self) -> None:
        self.seen: dict[bytes, tuple[str, str]] = {}

    def claim(self, items: list[tuple[bytes, str, str]]) -> list[str | None]:
        """For each ``(hash, occurrence key, id)``: ``None`` if this occurrence owns the
        hash (first seen, or the same occurrence asking again after a task retry), else
        the owner's id. Keys are ``source#row``, so equal ids in two places still differ."""
        out: list[str | None] = []
        for digest, key, doc_id in items:
            owner_key, owner_id = self.seen.setdefault(digest, (key, doc_id))
            out.append(None if owner_key == key else owner_id)
        return out


class Deduplicator:
    """Client side: routes hashes to their shard actors. Picklable into Ray tasks."""

    def __init__(self, shards: list[ray.actor.ActorHandle]):
        self.shards = shards

    @classmethod
    def start(cls, n_shards: int) -> Deduplicator:
        return cls([DedupShard.remote() for _ in range(n_shards)])

    def duplicates_of(self, docs: list[dict]) -> list[str | None]:
        """For each doc: ``None`` if it is the first copy, else the id of the first copy."""
        by_shard: dict[int, list[int]] = {}
        hashes = [text_hash(doc["text"]) for doc in docs]
        for i, digest in enumerate(hashes):
            by_shard.setdefault(int.from_bytes(digest[:8], "big") % len(self.shards), []).append(i)
        refs = {s: self.shards[s].claim.remote(
                    [(hashes[i], row_key(*identity(docs[i])), docs[i]["id"]) for i in idx])
                for s, idx in by_shard.items()}
        result: list[str | None] = [None] * len(docs)
        for s, idx in by_shard.items():
            for i, owner in zip(idx, ray.get(refs[s])):
                result[i] = owner
        return result

    def stop(self) -> None:
        for shard in self.shards:
            ray.kill(shard)

    def remember(self, rows: list[dict]) -> None:
        """Register documents an earlier attempt of the run kept (resume), so their
        copies still count as duplicates; claims by the same occurrence are no-ops."""
        if rows:
            self.duplicates_of(rows)
