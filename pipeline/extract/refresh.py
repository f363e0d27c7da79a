"""Incremental refresh: encode only new or changed images, delete removed ones, take label edits as data.

Changing the encoder, weights, layers, pooling or preprocessing changes the feature set's name,
so such a refresh starts a new feature set instead of mixing features.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import storage
from ..config import ExtractConfig
from .run import ExtractSummary
from .sync import sync_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshSummary:
    store_uri: str
    version: int | None
    added: int
    changed: int
    deleted: int
    unchanged: int
    seconds: float
    extract: ExtractSummary | None = None
    relabeled: int = 0
    published: bool = False  # a new version, even with no image changed (the source renamed its classes)
    copied: int = 0  # of the added and changed: images stored already under another row, vectors copied
    moved: int = 0  # of the unchanged: images that moved to another file under the same id, vectors copied

    @property
    def images_changed(self) -> bool:
        return bool(self.added or self.changed or self.deleted or self.relabeled)

    @property
    def nothing_changed(self) -> bool:
        return not (self.images_changed or self.published)

    def __str__(self) -> str:
        uri = storage.redact_uri(self.store_uri)
        if self.nothing_changed:
            return (f"nothing changed in {self.unchanged} images; {uri} stays at version {self.version} "
                    f"({self.seconds:.1f} s)")
        if not self.images_changed:
            return (f"refreshed {uri} to version {self.version}: no image changed, the source's listing or class "
                    f"names did; {self.unchanged} images kept ({self.seconds:.1f} s)")
        copied = (f" ({self.copied} of them stored already under other rows: vectors copied, not encoded)"
                  if self.copied else "")
        moved = f" ({self.moved} of them moved to other files)" if self.moved else ""
        return (f"refreshed {uri} to version {self.version}: {self.added} added, {self.changed} changed{copied}, "
                f"{self.deleted} deleted, {self.relabeled} relabelled, {self.unchanged} unchanged kept without "
                f"re-encoding{moved} ({self.seconds:.1f} s)")


def run_refresh(cfg: ExtractConfig) -> RefreshSummary:
    outcome = sync_store(cfg, operation="refresh")
    c = outcome.counts
    summary = RefreshSummary(outcome.store_uri, outcome.version, c["added"], c["changed"], c["deleted"],
                             c["unchanged"], outcome.seconds, outcome.extract, c["relabelled"], outcome.published,
                             c.get("copied", 0), c.get("moved", 0))
    log.info("%s", summary)
    return summary
