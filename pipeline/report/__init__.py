"""The report a person reads: transferability, similarity and geometry of feature sets, as static HTML + JSON."""
from .build import build_report

__all__ = ["build_report"]
