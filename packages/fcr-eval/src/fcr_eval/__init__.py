"""Metrics, statistics, DuckDB results store and experiment runner for FCR."""

__version__ = "0.1.0"
