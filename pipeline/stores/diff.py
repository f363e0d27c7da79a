"""A source listing against a version's live index: what to encode, delete and relabel."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .live import LiveIndex, state_of
from .writer import shard_plan_hash


@dataclass(frozen=True)
class ListingDiff:
    """A listing against a version's live index."""

    encode: list[dict]  # added and changed images, to encode
    added: int
    changed: int
    deletes: set[str]
    relabels: dict[str, tuple]  # image id -> new (uri, split, labels)
    unchanged: int

    @property
    def empty(self) -> bool:
        return not (self.encode or self.deletes or self.relabels)


def diff_listing(records: Sequence[dict], live: LiveIndex) -> ListingDiff:
    """What a listing adds, changes (new content), deletes and relabels (same content, new labels, split or URI)."""
    states = live.states()
    columns = list(live.label_columns)
    encode, relabels, added, unchanged, seen = [], {}, 0, 0, set()
    for r in records:
        image_id = r["image_id"]
        if image_id in seen:
            raise ValueError(f"the source lists image id {image_id!r} twice; image ids must be unique")
        seen.add(image_id)
        state = states.get(image_id)
        if state is None:
            encode.append(r)
            added += 1
        elif state.fingerprint != r["fingerprint"]:
            encode.append(r)
        else:
            labels = r.get("labels") or {}
            meta = state_of(r["uri"], r.get("split"), {c: labels.get(c) for c in columns})
            if meta != state.meta:
                relabels[image_id] = meta
            else:
                unchanged += 1
    return ListingDiff(encode, added, len(encode) - added, set(states) - seen, relabels, unchanged)


def chunk_records(records: Sequence[dict], shard_rows: int, *,
                  key: Callable[[dict], Any] = lambda r: r["image_id"]) -> list[tuple[tuple[dict, ...], str]]:
    """(records, content hash) per block-sized chunk, in ``key`` order (image id by default)."""
    ordered = sorted(records, key=key)
    chunks = [tuple(ordered[i:i + shard_rows]) for i in range(0, len(ordered), shard_rows)]
    return [(chunk, shard_plan_hash(chunk)) for chunk in chunks]
