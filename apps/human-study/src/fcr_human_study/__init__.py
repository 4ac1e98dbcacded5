"""Gradio A/B human preference study over FCR samples."""

__version__ = "0.1.0"
