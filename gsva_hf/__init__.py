"""Helpers around the GSVA model files: data readers, metrics, conversion, presets and command lines."""
