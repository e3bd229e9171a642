"""User ids become directory names, so every id is checked before it touches a path."""

from __future__ import annotations

import re

from soppu.errors import SoppuError

# Letters (any script), digits and a few separators; no path syntax, no whitespace.
_SAFE = re.compile(r"^[\w][\w.\-+@=]*$", re.UNICODE)
MAX_LENGTH = 128


class UnsafeUserId(SoppuError, ValueError):
    pass


def check_user_id(user: str, source: str = "") -> str:
    """Return `user` unchanged if it is safe as a single directory name, else raise."""
    where = f" (from {source})" if source else ""
    if not isinstance(user, str) or not user:
        raise UnsafeUserId(f"empty user id{where}")
    if any(ord(c) < 32 or ord(c) == 127 for c in user):
        raise UnsafeUserId(f"user id {user!r}{where} contains control characters")
    if user in (".", "..") or "/" in user or "\\" in user or user.startswith("~"):
        raise UnsafeUserId(f"user id {user!r}{where} is a path, not a name")
    if len(user) > MAX_LENGTH:
        raise UnsafeUserId(f"user id {user[:20]!r}...{where} is longer than {MAX_LENGTH}")
    if not _SAFE.match(user):
        raise UnsafeUserId(
            f"user id {user!r}{where} may hold only letters, digits and . _ - + @ = "
            "and must start with a letter, digit or _"
        )
    return user


def slugify_user_id(text: str) -> str:
    """A safe id from free text such as 'Hamlet / LADY MACBETH' (spaces become _)."""
    slug = re.sub(r"[^\w.\-+@=]+", "_", text.strip(), flags=re.UNICODE).strip("_.")
    return check_user_id(slug[:MAX_LENGTH] or "_", source=repr(text))
