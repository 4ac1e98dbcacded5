"""What every FCR command shares, on the standard library alone: one-line errors for bad input
(:mod:`fcr_common.cli_errors`), the single-writer process lock (:mod:`fcr_common.locking`) and the
code version stored with every number (:mod:`fcr_common.provenance`)."""

__version__ = "0.1.0"
