"""Image ids must be unique across a job's units, including those whose ids only their tasks see.

The driver checks ids at listing wherever it can read them cheaply (manifests, Parquet id and path columns).
An Arrow file of ``save_to_disk`` is only readable whole, so its ids (an ``id_column``, or image paths unique
within the file) are first seen by the task that expands it; the task sends their 8-byte hashes on the
unit's plan (``CHECK_IDS`` units), and the driver refuses the commit when two units share an id. Such units
have no fingerprint, so every refresh plans all of them again and the check covers the whole source.
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
    raise RepeatedImageIds(
        f"{len(repeated)} image id(s) repeat across source units {units[:EXAMPLES]}"
        f"{f' and {len(units) - EXAMPLES} more' if len(units) > EXAMPLES else ''}"
        f"{f', e.g. {shown}' if shown else ''}: a store is keyed by image id, and these ids come from "
        f"source.options.id_column or the image paths; name a column unique across the whole dataset in "
        f"source.options.id_column, or set source.options.row_ids=true for '<file>/<row>' ids. Nothing was "
        f"published")


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
