"""Atom feeds of findings (RFC 4287): one per owner and one per watched base, so an owner
can subscribe to new findings about their models in any feed reader.

Built with ElementTree, which escapes every text and attribute: repo ids, titles and
messages are attacker-written. Links are relative to the feed file unless the site's
public URL is known (``site_url``), in which case they are absolute, as readers prefer.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

ATOM_NS = "http://www.w3.org/2005/Atom"


@dataclass(frozen=True)
class FeedEntry:
    key: str  # stable identity of the finding (subject, revision, rule, related repo)
    title: str
    href: str  # relative to the site root
    updated: datetime
    summary: str
    author: str


def _stamp(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uri(kind: str, key: str) -> str:
    return f"urn:auditor:{kind}:{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}"


def atom_feed(*, key: str, title: str, subtitle: str, feed_path: str, page_path: str,
              entries: Sequence[FeedEntry], generated: datetime,
              site_url: str | None = None) -> str:
    """The feed document; ``feed_path``/``page_path``/entry hrefs are site-root relative."""
    depth = feed_path.count("/")

    def link(path: str) -> str:
        if site_url:
            return site_url.rstrip("/") + "/" + path
        return "../" * depth + path

    ET.register_namespace("", ATOM_NS)
    feed = ET.Element(f"{{{ATOM_NS}}}feed")

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        el = ET.SubElement(parent, f"{{{ATOM_NS}}}{tag}", attrs)
        if text is not None:
            el.text = text
        return el

    ordered = sorted(entries, key=lambda e: e.updated, reverse=True)
    sub(feed, "id", _uri("feed", key))
    sub(feed, "title", title)
    sub(feed, "subtitle", subtitle)
    sub(feed, "updated", _stamp(ordered[0].updated if ordered else generated))
    sub(feed, "link", rel="self", type="application/atom+xml", href=link(feed_path))
    sub(feed, "link", rel="alternate", type="text/html", href=link(page_path))
    sub(feed, "generator", "auditor")
    for e in ordered:
        entry = sub(feed, "entry")
        sub(entry, "id", _uri("finding", e.key))
        sub(entry, "title", e.title)
        sub(entry, "updated", _stamp(e.updated))
        sub(entry, "link", rel="alternate", type="text/html", href=link(e.href))
        author = sub(entry, "author")
        sub(author, "name", e.author)
        sub(entry, "summary", e.summary)
    body = ET.tostring(feed, encoding="unicode")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + body + "\n"
