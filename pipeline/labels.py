"""What counts as a missing label, for the probes and the analysis alike."""
from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
import pandas as pd

#: Columns of a store's index that are bookkeeping, never a task's labels.
INDEX_COLUMNS = frozenset({"image_id", "uri", "fingerprint", "row", "status", "split", "shard"})


def missing_labels(labels) -> np.ndarray:
    """True where a label is None, NaN or an empty/blank string."""
    labels = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels, dtype=object))
    miss = labels.isna().to_numpy().copy()
    if labels.dtype == object or pd.api.types.is_string_dtype(labels.dtype):
        miss |= labels.astype(str).str.strip().eq("").to_numpy() & ~miss
    return miss


def unknown_task_message(name: str, columns: Sequence[str]) -> str:
    """Why ``name`` is no task: the label columns there are, and the closest one."""
    labels = [c for c in columns if c not in INDEX_COLUMNS]
    close = difflib.get_close_matches(name, labels, n=1) or [c for c in labels if c.lower() == name.lower()]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"task {name!r}: no such label column{hint}; label columns: {labels}. Fix the name in probes.tasks"
