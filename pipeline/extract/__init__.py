"""Distributed extraction: the Ray Data plan from sources through encoders into feature stores."""
from .plan import build_target
from .run import ExtractSummary
from .sync import run_extract, sync_store

__all__ = ["ExtractSummary", "build_target", "run_extract", "sync_store"]
