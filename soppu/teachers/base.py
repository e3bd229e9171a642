"""The teacher interface, and which teacher a node uses."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from soppu.repair import TeacherAnswer


class Teacher(Protocol):
    kind: str  # "api" or "local": what the node reports

    def answer(self, texts: list[str]) -> list[TeacherAnswer]:
        """The full model's answer to scoring each piece of text (pieces of < 2 tokens are
        left out)."""
        ...


class NoTeacher(LookupError):
    """The server asks for a repair, and this node has no teacher to ask."""


def for_node(node_config: Mapping[str, object], base_model: str, precision: str) -> Teacher:
    """`teacher-url` (with `teacher-key`, else $SOPPU_API_KEY, and `teacher-model`, else the
    server's base model id) → that serving API; a simulated node (no `user-id` of its own) →
    the full model in this process; a real node without a teacher-url cannot repair."""
    url = str(node_config.get("teacher-url", ""))
    if url:
        from soppu.teachers.api import ApiTeacher

        key = str(node_config.get("teacher-key", "")) or os.environ.get("SOPPU_API_KEY")
        return ApiTeacher(url, str(node_config.get("teacher-model", "")), key or None)
    if "user-id" in node_config:
        raise NoTeacher(
            "the server asks for a repair of the emulator (repair-steps), and this node's "
            "config names no teacher-url (the serving API the user scores text with)"
        )
    from soppu.teachers.local import LocalTeacher

    return LocalTeacher(base_model, precision)
