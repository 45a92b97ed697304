"""YAML reading that remembers line numbers, so errors can name the field *and* the line.

``load_yaml(path)`` returns a :class:`Doc` whose :meth:`Doc.get` walks a dotted/indexed field
path (``nodes[2].count``) and raises :class:`InputError` naming the field and its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

_MISSING = object()


@dataclass(slots=True)
class Node:
    """A YAML value with the 1-based line it started on."""

    value: Any
    line: int


def _convert(node: yaml.Node, source: str) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for k, v in node.value:
            key = yaml.safe_load(yaml.serialize(k)) if not isinstance(k, yaml.ScalarNode) else k.value
            if str(key) in out:  # plain YAML loaders keep the last one silently
                raise InputError(f"duplicate key {str(key)!r} (first on line {out[str(key)].line})",
                                 source=source, line=k.start_mark.line + 1, field=str(key))
            out[str(key)] = _convert(v, source)
        return Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(v, source) for v in node.value], line)
    # Scalars: let the safe loader resolve the tag (int, float, bool, null, str).
    return Node(yaml.SafeLoader(yaml.serialize(node)).get_single_data(), line)


def strip(node: Node) -> Any:
    """Plain Python value of a :class:`Node` tree."""
    if isinstance(node.value, dict):
        return {k: strip(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [strip(v) for v in node.value]
    return node.value


class Doc:
    """A parsed YAML document with line-aware, typed field access."""

    def __init__(self, root: Node, source: str) -> None:
        self.root = root
        self.source = source

    def error(self, field: str, message: str, line: int | None = None) -> InputError:
        return InputError(message, source=self.source, line=line, field=field)

    def node(self, field: str, base: Node | None = None, default: Any = _MISSING,
             label: str | None = None) -> Node | None:
        """Return the node at ``field`` (``a.b[2].c``) relative to ``base`` (default: root);
        ``label`` is the full field name used in messages when ``base`` is not the root."""
        cur = self.root if base is None else base
        path = ""
        for part in field.replace("]", "").replace("[", ".[").split("."):
            if not part:
                continue
            if part.startswith("["):
                idx = int(part[1:])
                path += f"[{idx}]"
                if not isinstance(cur.value, list) or idx >= len(cur.value):
                    raise self.error(path, "missing list item", cur.line)
                cur = cur.value[idx]
                continue
            path = f"{path}.{part}" if path else part
            if not isinstance(cur.value, dict):
                raise self.error(path, f"expected a mapping, got {type(cur.value).__name__}", cur.line)
            if part not in cur.value:
                if default is not _MISSING:
                    return None
                raise self.error(label or path, "required field is missing", cur.line)
            cur = cur.value[part]
        return cur

    def check_keys(self, allowed: set[str] | tuple[str, ...], base: Node | None = None,
                   label: str = "") -> None:
        """Raise naming the first key of the mapping ``base`` (default: root) not in
        ``allowed``: a misspelt optional field would otherwise be ignored silently."""
        cur = self.root if base is None else base
        if not isinstance(cur.value, dict):
            return
        for key, node in cur.value.items():
            if key not in allowed:
                field = f"{label}.{key}" if label else key
                raise self.error(field, f"unknown field (expected one of {', '.join(sorted(allowed))})",
                                 node.line)

    def number(self, field: str, base: Node | None = None, *, label: str | None = None,
               default: float | None = None, positive: bool = True, integer: bool = False,
               optional: bool = False) -> float:
        """A numeric field; ``label`` is the full field name used in messages. Absent: an error,
        unless a ``default`` is given or ``optional`` (then None)."""
        label = label or field
        node = self.node(field, base, None if default is not None or optional else _MISSING, label)
        if node is None:
            return default  # type: ignore[return-value]
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(label, f"expected a number, got {v!r}", node.line)
        if integer and (not isinstance(v, int)):
            raise self.error(label, f"expected an integer, got {v!r}", node.line)
        if positive and not v > 0:
            raise self.error(label, f"must be > 0, got {v!r}", node.line)
        return v

    def string(self, field: str, base: Node | None = None, *, label: str | None = None,
               default: str | None = None) -> str:
        label = label or field
        node = self.node(field, base, None if default is not None else _MISSING, label)
        if node is None:
            return default  # type: ignore[return-value]
        if not isinstance(node.value, str) or not node.value:
            raise self.error(label, f"expected a non-empty string, got {node.value!r}", node.line)
        return node.value


def load_yaml(path: str | Path, text: str | None = None) -> Doc:
    """Parse a YAML file (or ``text``) into a line-aware :class:`Doc`."""
    source = str(path)
    if text is None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InputError(f"cannot read file ({exc.strerror})", source=source) from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InputError(f"invalid YAML: {exc.problem}", source=source, line=line) from exc
    if root is None:
        raise InputError("file is empty", source=source)
    return Doc(_convert(root, source), source)
