"""What counts as a missing label, for the probes and the analysis alike."""
from __future__ import annotations

import numpy as np
import pandas as pd


def missing_labels(labels) -> np.ndarray:
    """True where a label is None, NaN or an empty/blank string."""
    labels = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels, dtype=object))
    miss = labels.isna().to_numpy().copy()
    if labels.dtype == object or pd.api.types.is_string_dtype(labels.dtype):
        miss |= labels.astype(str).str.strip().eq("").to_numpy() & ~miss
    return miss
