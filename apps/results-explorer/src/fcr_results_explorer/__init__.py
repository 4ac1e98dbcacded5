"""Streamlit explorer over the FCR DuckDB results store."""

__version__ = "0.1.0"
