"""Kangaroo: open training recipes for long-video language models."""

__version__ = "0.1.0"
