"""Bounds on user input shared by the library and the command line.

Kept free of heavy imports, so the command line can declare its options'
ranges from them without importing scikit-learn or torch.
"""

from __future__ import annotations

__all__ = ["MAX_BINS"]

MAX_BINS = 10_000
"""The most bins any metric or calibrator takes: more would only hold empty
bins (and 10^9 of them would exhaust memory before computing anything)."""
