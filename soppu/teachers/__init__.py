"""Where a client's repair gets its teacher: the full model's answer to scoring the user's text.

`base.Teacher` is the interface; `api.ApiTeacher` asks a serving API (`soppu serve` or vLLM)
what it answers when the user scores their text, `local.LocalTeacher` computes the same answer
with the full model in the client's own process (simulation, where the client's machine is the
server's). `for_node` picks one from a node's config.
"""

from soppu.teachers.base import NoTeacher, Teacher, for_node

__all__ = ["NoTeacher", "Teacher", "for_node"]
