"""Image ids must be unique across a job's units, including those whose ids only their tasks see.

The driver checks ids at listing wherever it can read them cheaply (manifests, Parquet id and path columns).
An Arrow file of ``save_to_disk`` is only readable whole, so its ids (an ``id_column``, or image paths unique
within the file) are first seen by the task that expands it; the task sends their 8-byte hashes on the
unit's plan (``CHECK_IDS`` units), and the driver refuses the commit when two units share an id. Such units
have no fingerprint, so every refresh plans all of them again and the check covers the whole source.

On Ray, each task also registers its unit's hashes with the job's progress actor (:class:`IdRegistry`) as soon
as the unit is planned, so a job whose ids repeat stops at the second unit that lists them, before that unit
encodes anything, not after the whole dataset is encoded.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..sources.units import id_hash, sorted_id_hashes
from ..stores import FeatureStoreWriter
from ..stores.units import UnitPlan, unit_live_index

EXAMPLES = 3


class RepeatedImageIds(ValueError):
    """Two source units list the same image id; nothing was published."""


class IdRegistry:
    """Id hashes of the units planned so far, as sorted runs merged by size (12 bytes an id, O(log) runs)."""

    def __init__(self) -> None:
        self.units: dict[str, int] = {}
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, index of the unit of each)

    def add(self, unit: str, hashes: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Register ``unit``'s hashes unless another unit has one of them: then (those units, the shared hashes),
        and ``unit`` is not registered. A unit registered before (its task ran again) is accepted as it is."""
        if unit in self.units:
            return [], np.zeros(0, np.uint64)
        mine = np.sort(np.asarray(hashes, dtype=np.uint64))
        owners, shared = set(), []
        for run, owner in self.runs:
            pos = np.minimum(np.searchsorted(run, mine), len(run) - 1)
            hit = run[pos] == mine
            owners.update(owner[pos[hit]].tolist())
            shared.append(mine[hit])
        if owners:
            names = sorted(u for u, k in self.units.items() if k in owners)
            return names, np.unique(np.concatenate(shared))
        k = self.units[unit] = len(self.units)
        if not len(mine):
            return [], mine
        self.runs.append((mine, np.full(len(mine), k, np.int32)))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (a, oa), (b, ob) = self.runs.pop(), self.runs.pop()
            merged = np.concatenate([a, b])
            order = np.argsort(merged, kind="stable")
            self.runs.append((merged[order], np.concatenate([oa, ob])[order]))
        return [], np.zeros(0, np.uint64)


def repeated_ids_error(n: int, units: Sequence[str], examples: Sequence[str]) -> RepeatedImageIds:
    return RepeatedImageIds(
        f"{n} image id(s) repeat across source units {list(units)[:EXAMPLES]}"
        f"{f' and {len(units) - EXAMPLES} more' if len(units) > EXAMPLES else ''}"
        f"{f', e.g. {list(examples)}' if examples else ''}: a store is keyed by image id, and these ids come from "
        f"source.options.id_column or the image paths; name a column unique across the whole dataset in "
        f"source.options.id_column, or set source.options.row_ids=true for '<file>/<row>' ids. Nothing was "
        f"published")


def refuse_repeats_across_units(plans: Sequence[UnitPlan], writer: FeatureStoreWriter,
                                written: Mapping[int, Mapping]) -> None:
    """Raise RepeatedImageIds naming the units and a few ids when the checked units' ids are not unique."""
    checked = [p for p in plans if p.id_hashes is not None and len(p.id_hashes)]
    if len(checked) < 2:
        return
    hashes, owner = sorted_id_hashes([p.id_hashes for p in checked])
    same = (hashes[1:] == hashes[:-1]) & (owner[1:] != owner[:-1])  # a unit's own ids are unique (its task checks)
    if not same.any():
        return
    repeated = set(np.unique(hashes[1:][same]).tolist())
    units = sorted({checked[i].unit.unit_id for i in np.concatenate([owner[1:][same], owner[:-1][same]]).tolist()})
    shown = _example_ids([checked[i] for i in sorted(set(owner[1:][same].tolist()))], repeated, writer, written)
    raise repeated_ids_error(len(repeated), units, shown)


def _example_ids(plans: Sequence[UnitPlan], repeated: set[int], writer: FeatureStoreWriter,
                 written: Mapping[int, Mapping]) -> list[str]:
    """A few of the repeated ids, read back from the index rows the units' blocks were written with."""
    found: set[str] = set()
    for plan in plans:
        try:
            ids = unit_live_index(writer, plan.change(written).result()).table.column("image_id").to_pylist()
        except (KeyError, OSError):  # the message names the units either way
            continue
        found.update(i for i in ids if id_hash(i) in repeated)
        if len(found) >= EXAMPLES:
            break
    return sorted(found)[:EXAMPLES]
