"""Measured speed on the site: the method comparison page and each paper's speedup.

Everything here is read from the committed results files in ``docs/benchmarks/``
(``reference-<device>.json``, ``vlm-<device>.json``); no number is typed in.
"""

from __future__ import annotations

from tools.loader import Catalog
from tools.schema import PaperBase


def comparison_page(
    catalog: Catalog, reference_results: dict[str, dict], vlm_results: dict[str, dict]
) -> str:
    """Text of ``comparison.md``: every benchmarked method side by side."""
    return "# Method comparison\n\nNot written yet.\n"


def paper_speed(
    paper: PaperBase, reference_results: dict[str, dict], vlm_results: dict[str, dict]
) -> str:
    """An HTML fragment for the paper page: the measured speedup and budget, or ``""``."""
    return ""
