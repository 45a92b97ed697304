"""Errors raised for bad planner inputs (cluster/model YAML, trace CSV, plan JSON)."""

from __future__ import annotations


class InputError(ValueError):
    """A user-supplied input is invalid.

    The message always names the file, the offending field and, when known, the line, e.g.
    ``cluster.yaml:12: nodes[2].count: must be a positive integer, got -1``.
    """

    def __init__(self, message: str, *, source: str = "<input>", line: int | None = None,
                 field: str | None = None) -> None:
        self.source = source
        self.line = line
        self.field = field
        where = source if line is None else f"{source}:{line}"
        what = f"{field}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


class UnknownModel(InputError):
    """A model name that is neither a preset nor a model YAML file."""
