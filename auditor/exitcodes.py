"""Documented exit codes, as scanners (modelscan, picklescan) use them."""

from enum import IntEnum


class ExitCode(IntEnum):
    CLEAN = 0  # audited, no active finding
    FINDINGS = 1  # audited, at least one active (unsuppressed) finding
    ERROR = 2  # the audit could not be done (bad input, hub error, ...)
    NOTHING_SCANNED = 3  # nothing supported to scan (no weights at all)
