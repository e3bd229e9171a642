"""The one base of SOPPU's errors about its input: the CLI prints any of them as one line.

Each subclass also keeps its builtin base (ValueError, FileExistsError, ...), so callers that
catch those go on working."""

from __future__ import annotations


class SoppuError(Exception):
    """Bad input or a refused write; the message names the file and what is wrong."""
