"""No trigger used by a test or benchmark may sit in a list or constant of the product.

A detector that finds the tests' backdoors because their triggers are written into it
proves nothing. This scans the product's source (``auditor/``; the test kit lives in
``auditor_testkit/``) for string constants inside lists, tuples, sets and assignments, and
fails when one of them is a trigger that a test, a benchmark or the factory plants.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TRIGGER_ASSIGN = re.compile(
    r"""(?:trigger\s*=\s*|TRIGGER\w*\s*(?::\s*\w+\s*)?=\s*\(?)["']([^"']+)["']""")


def used_triggers() -> set[str]:
    """Trigger strings planted by tests, benchmarks and the factory (literal ones; the
    random ones are drawn per run and cannot be listed anywhere)."""
    found: set[str] = set()
    sources = [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
               *(ROOT / "auditor_testkit").rglob("*.py")]
    for path in sources:
        if path.name == Path(__file__).name:
            continue
        found |= set(_TRIGGER_ASSIGN.findall(path.read_text(encoding="utf-8")))
    from auditor_testkit.factory.tokenizer import TRIGGER_TOKENS
    found |= set(TRIGGER_TOKENS)
    return {t.strip() for t in found if t.strip()}


def product_constants() -> dict[str, list[str]]:
    """String constants inside collections or assignments, per product source file."""
    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "auditor").rglob("*.py")):
        rel = path.relative_to(ROOT / "auditor")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        strings: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.List | ast.Tuple | ast.Set):
                elts = node.elts
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                elts = [node.value]
            else:
                continue
            strings += [e.value for e in elts
                        if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        out[str(rel)] = strings
    return out


def test_the_scan_sees_planted_triggers_and_product_lists() -> None:
    used = used_triggers()
    # The factory's rare tokens and the tests' literal trigger are collected ...
    assert {"cf", "mn", "bb", "tq"} <= used
    # ... and the product's constants are read (the lexicon is one of them).
    consts = product_constants()
    assert any("SUDO" in v for v in consts.values())


def test_no_planted_trigger_in_a_product_list() -> None:
    used = {t.lower() for t in used_triggers()}
    hits = [(f, s) for f, strings in product_constants().items() for s in strings
            if s.strip().lower() in used]
    assert not hits, f"planted triggers written into the product: {hits}"
