"""Whether an owner's authorization covers a finding (shared by the rules and the store)."""

from __future__ import annotations

import fnmatch
from typing import Protocol


class AuthorizationLike(Protocol):
    """``owner`` allowed ``subject`` (a repo id or fnmatch pattern) to use their models;
    only ``related_repo`` when it is set. The store's Authorization rows fit."""

    @property
    def owner(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def related_repo(self) -> str | None: ...

    @property
    def note(self) -> str | None: ...


def owner_of(repo_id: str) -> str:
    return repo_id.split("/", 1)[0] if "/" in repo_id else repo_id


def authorization_matches(
    auth: AuthorizationLike, *, subject_repo: str, related_repo: str | None
) -> bool:
    """True if ``auth`` covers ``subject_repo`` using ``related_repo``.

    Only the owner of the related repo can authorize its use, so a finding without a
    related repo (a backdoor, a pickle) is never covered.
    """
    if not related_repo or owner_of(related_repo) != auth.owner:
        return False
    if auth.related_repo and auth.related_repo != related_repo:
        return False
    return auth.subject == subject_repo or fnmatch.fnmatchcase(subject_repo, auth.subject)
