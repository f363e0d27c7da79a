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
    moved: int = 0  # of the unchanged and relabelled: images that moved to another file under their id
    renamed: tuple[str, ...] = ()  # label columns whose class names the source renamed

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
            why = (f"the source renamed the classes of {', '.join(self.renamed)}" if self.renamed else
                   "the source's files did (their new fingerprints are recorded)")
            return (f"refreshed {uri} to version {self.version}: no image changed, {why}; {self.unchanged} images "
                    f"kept ({self.seconds:.1f} s)")
        notes = []
        if self.copied:
            notes.append(f"{self.copied} of the added and changed were stored already under other rows: vectors "
                         f"copied, not encoded")
        if self.moved:
            notes.append(f"{self.moved} moved to other files under their ids, vectors copied")
        errors = self.extract.errors if self.extract is not None else 0
        if errors:
            notes.append(f"{errors} could not be read or decoded: recorded as errors, without vectors")
        return (f"refreshed {uri} to version {self.version}: {self.added} added, {self.changed} changed, "
                f"{self.deleted} deleted, {self.relabeled} relabelled, {self.unchanged} unchanged kept without "
                f"re-encoding ({self.seconds:.1f} s)" + "".join(f"; {n}" for n in notes))


def run_refresh(cfg: ExtractConfig) -> RefreshSummary:
    outcome = sync_store(cfg, operation="refresh")
    c = outcome.counts
    summary = RefreshSummary(outcome.store_uri, outcome.version, c["added"], c["changed"], c["deleted"],
                             c["unchanged"], outcome.seconds, outcome.extract, c["relabelled"], outcome.published,
                             c.get("copied", 0), c.get("moved", 0), outcome.renamed)
    log.info("%s", summary)
    return summary
