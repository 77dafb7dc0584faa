"""The `evaluate` module for gRefCOCO / RefZOM metrics; load it with `evaluate.load(GRES_METRIC_DIR)`.

The script `gres_metric.py` holds no metric code of its own: it imports `gsva_hf.metrics`, the single source of
the arithmetic, so `gsva_hf` must be importable (installed, or the repository root on `sys.path`) wherever the
metric is loaded. This package file only exposes the folder path and imports neither `evaluate` nor `datasets`.
"""

from pathlib import Path

GRES_METRIC_DIR = str(Path(__file__).resolve().parent)
"""Folder to pass to `evaluate.load`; evaluate finds `gres_metric.py` inside it (folder name + `.py`)."""

__all__ = ["GRES_METRIC_DIR"]
