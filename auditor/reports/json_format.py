"""The JSON report: the ``AuditReport`` as it is, keys sorted so two runs diff cleanly."""

from __future__ import annotations

import json
from collections.abc import Sequence

from auditor.schema import AuditReport, RuleMeta


def format_report(report: AuditReport, *, rules: Sequence[RuleMeta] = ()) -> str:
    """``report.model_dump(mode="json")`` with stable key order; ``rules`` is unused.

    ``AuditReport.model_validate_json`` reads it back to an equal report.
    """
    del rules  # the JSON report carries findings only; rule metadata lives in the rule files
    return json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True,
                      ensure_ascii=False, allow_nan=False) + "\n"
