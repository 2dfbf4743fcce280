"""Model-card parsing: normal cards, relation inference and hostile input."""

from __future__ import annotations

import json
import time

from auditor.hub.card import CardInfo, card_from_data, derive_tags, is_repo_id, parse_card


def _card(yaml_text: str) -> str:
    return f"---\n{yaml_text}\n---\n# Body\n"


def test_single_base_and_fields() -> None:
    card = parse_card(_card(
        "base_model: org/base\nlicense: mit\ntags: [a, b]\npipeline_tag: text-generation"))
    assert card.base_models == ["org/base"]
    assert card.relation is None
    assert card.tags == ["a", "b"]
    assert card.license == "mit"
    assert card.pipeline_tag == "text-generation"
    assert card.warnings == []
    assert card.data["license"] == "mit"


def test_list_of_bases_and_declared_relation() -> None:
    card = parse_card(_card("base_model:\n  - org/a\n  - org/b\nbase_model_relation: merge"))
    assert card.base_models == ["org/a", "org/b"]
    assert card.relation == "merge"


def test_derive_tags_relation_inference() -> None:
    single = CardInfo(base_models=["org/base"])
    assert derive_tags(single, has_adapter=False) == [
        "base_model:org/base", "base_model:finetune:org/base"]
    assert "base_model:adapter:org/base" in derive_tags(single, has_adapter=True)
    merged = CardInfo(base_models=["org/a", "org/b"])
    tags = derive_tags(merged, has_adapter=False)
    assert "base_model:merge:org/a" in tags and "base_model:merge:org/b" in tags
    quant = CardInfo(base_models=["org/a"], relation="quantized")
    assert derive_tags(quant, has_adapter=True) == [
        "base_model:org/a", "base_model:quantized:org/a"]
    assert derive_tags(CardInfo(), has_adapter=True) == []


def test_no_front_matter() -> None:
    card = parse_card("# just a readme\n---\nbase_model: org/x\n---\n")
    assert card.base_models == []


def test_malformed_yaml_gives_warning_not_exception() -> None:
    card = parse_card(_card("base_model: [org/a\nlicense: : :"))
    assert card.base_models == []
    assert any("malformed" in w for w in card.warnings)


def test_non_mapping_front_matter() -> None:
    card = parse_card(_card("- just\n- a list"))
    assert card.base_models == [] and card.warnings


def test_weird_types_are_ignored_with_warnings() -> None:
    card = parse_card(_card(
        "base_model: {nested: dict}\nbase_model_relation: theft\ntags: [1, ok, null]\n"
        "license: [mit]\ncreated: 2024-01-01"))
    assert card.base_models == []
    assert card.relation is None
    assert card.tags == ["ok"]
    assert card.license is None
    assert len(card.warnings) >= 4
    json.dumps(card.data)  # dates and other YAML types were made JSON-safe
    assert card.data["created"] == "2024-01-01"


def test_invalid_repo_ids_rejected() -> None:
    card = parse_card(_card(
        'base_model:\n  - "../../etc/passwd"\n  - "<script>alert(1)</script>"\n'
        '  - "org/ok-name"\n  - "a/b/c"\n  - "org--x/y"'))
    assert card.base_models == ["org/ok-name"]
    assert sum("not a valid repo id" in w for w in card.warnings) == 4
    assert is_repo_id("gpt2") and is_repo_id("org/Name_1.5")
    assert not is_repo_id("org/") and not is_repo_id("org/na..me") and not is_repo_id(3)


def test_script_tags_kept_as_plain_data() -> None:
    card = parse_card(_card('tags: ["<script>alert(1)</script>"]\nlicense: "<b>x</b>"'))
    # Cards are data: escaping is the HTML formatter's job, the parser must keep text intact.
    assert card.tags == ["<script>alert(1)</script>"]
    assert card.license == "<b>x</b>"


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        bomb.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
        prev = name
    start = time.monotonic()
    card = parse_card(_card("\n".join(bomb) + "\nbase_model: org/x"))
    assert time.monotonic() - start < 2
    assert card.base_models == []
    assert any("aliases" in w for w in card.warnings)


def test_huge_card_is_truncated() -> None:
    text = _card("base_model: org/x") + "x" * 3_000_000
    card = parse_card(text)
    assert card.base_models == ["org/x"]
    assert any("truncated" in w for w in card.warnings)


def test_huge_front_matter_ignored() -> None:
    text = _card("base_model: org/x\nfiller: " + "y" * 400_000)
    card = parse_card(text)
    assert card.base_models == []
    assert card.warnings


def test_deep_nesting_and_many_nodes_are_capped() -> None:
    deep = {"base_model": "org/x"}
    node: dict = deep
    for _ in range(100):
        node["n"] = {}
        node = node["n"]
    card = card_from_data({**deep, "big": list(range(50_000))})
    assert card.base_models == ["org/x"]
    assert any("truncated" in w for w in card.warnings)
    assert len(json.dumps(card.data)) < 1_000_000


def test_bytes_input_and_bom() -> None:
    card = parse_card("\ufeff---\nbase_model: org/x\n---\n".encode() + b"\xff\xfe junk")
    assert card.base_models == ["org/x"]
