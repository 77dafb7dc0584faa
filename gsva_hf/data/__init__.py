"""Readers for GSVA's data tree and the synthetic task; every reader yields `Sample`s."""

from .sample import Sample

__all__ = ["Sample"]
