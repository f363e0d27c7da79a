"""Distributed extraction: the Ray Data plan from sources through encoders into feature stores."""
from .plan import ExtractPlan, ShardTask, build_plan
from .run import ExtractSummary, run_extract

__all__ = ["ExtractPlan", "ExtractSummary", "ShardTask", "build_plan", "run_extract"]
