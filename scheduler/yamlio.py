"""YAML reading that remembers line numbers, so errors can name the field *and* the line.

``load_yaml(path)`` returns a :class:`Doc` whose :meth:`Doc.get` walks a dotted/indexed field
path (``nodes[2].count``) and raises :class:`InputError` naming the field and its line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

_MISSING = object()
_FLOATISH = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e6: YAML 1.1 text, not a number


@dataclass(slots=True)
class Node:
    """A YAML value with the 1-based line it started on (None: from JSON, no line known)."""

    value: Any
    line: int | None


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
    # Scalars: the safe loader's constructor for the tag the composer resolved (int, float,
    # bool, null, str). Re-serialising the node instead fails on an empty one (``key:``).
    return Node(yaml.SafeLoader("").construct_object(node, deep=True), line)


def wrap(value: Any) -> Node:
    """A :class:`Node` tree of plain (JSON) data, without line numbers."""
    if isinstance(value, dict):
        return Node({str(k): wrap(v) for k, v in value.items()}, None)
    if isinstance(value, list):
        return Node([wrap(v) for v in value], None)
    return Node(value, None)


def strip(node: Node) -> Any:
    """Plain Python value of a :class:`Node` tree."""
    if isinstance(node.value, dict):
        return {k: strip(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [strip(v) for v in node.value]
    return node.value


class Doc:
    """A parsed YAML document with line-aware, typed field access.

    ``prefix`` names where the document sits inside a bigger one (``inputs.cluster`` of a plan
    JSON): every field named in an error starts with it."""

    def __init__(self, root: Node, source: str, prefix: str = "") -> None:
        self.root = root
        self.source = source
        self.prefix = prefix

    @classmethod
    def from_data(cls, data: Any, source: str, prefix: str = "") -> Doc:
        """A :class:`Doc` over already parsed data (a plan JSON's section): the same checks,
        fields named from ``prefix``, no line numbers."""
        return cls(wrap(data), source, prefix)

    def error(self, field: str, message: str, line: int | None = None) -> InputError:
        if self.prefix:
            field = f"{self.prefix}.{field}" if field else self.prefix
        return InputError(message, source=self.source, line=line, field=field or None)

    def mapping(self, node: Node, label: str, what: str = "a mapping") -> dict[str, Node]:
        """``node``'s mapping, or an error naming ``label`` (``nodes[0]``, ``catalog.L40S``)."""
        if not isinstance(node.value, dict):
            got = ("nothing" if node.value is None else type(node.value).__name__
                   if isinstance(node.value, list) else f"{type(node.value).__name__} {node.value!r}")
            raise self.error(label, f"expected {what}, got {shorten(got)}", node.line)
        return node.value

    def node(self, field: str, base: Node | None = None, default: Any = _MISSING,
             label: str | None = None) -> Node | None:
        """Return the node at ``field`` (``a.b[2].c``) relative to ``base`` (default: root);
        ``label`` is the full field name used in messages when ``base`` is not the root."""
        cur = self.root if base is None else base
        # the full name of ``base`` (``nodes[0]``) when ``label`` extends ``field`` from it
        base_label = label[:-len(field) - 1] if label and label.endswith("." + field) else ""

        def full(rel: str) -> str:
            return f"{base_label}.{rel}" if base_label and rel and not rel.startswith("[") \
                else base_label + rel

        path = ""
        for part in field.replace("]", "").replace("[", ".[").split("."):
            if not part:
                continue
            if part.startswith("["):
                idx = int(part[1:])
                if not isinstance(cur.value, list):
                    raise self.error(full(path), f"expected a list, got {type(cur.value).__name__}",
                                     cur.line)
                path += f"[{idx}]"
                if idx >= len(cur.value):
                    raise self.error(full(path), "missing list item", cur.line)
                cur = cur.value[idx]
                continue
            if not isinstance(cur.value, dict):  # the parent is not a mapping: name the parent
                got = "nothing" if cur.value is None else type(cur.value).__name__
                raise self.error(full(path), f"expected a mapping, got {got}", cur.line)
            path = f"{path}.{part}" if path else part
            if part not in cur.value:
                if default is not _MISSING:
                    return None
                raise self.error(label or full(path), "required field is missing", cur.line)
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
               optional: bool = False, minimum: float | None = None) -> float:
        """A finite numeric field, > 0 (``positive``) or else >= ``minimum`` where given;
        ``label`` is the full field name used in messages. Absent (or null): an error, unless a
        ``default`` is given or ``optional`` (then None)."""
        label = label or field
        absent_ok = default is not None or optional
        node = self.node(field, base, None if absent_ok else _MISSING, label)
        if node is None or (absent_ok and node.value is None):  # `key: null` = not given
            return default  # type: ignore[return-value]
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            hint = ""
            if isinstance(v, str) and _FLOATISH.fullmatch(v.strip()):
                hint = " (YAML reads 1e6 as text: write 1.0e+6)"
            raise self.error(label, f"expected a number, got {shorten(repr(v))}{hint}", node.line)
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an int beyond any float (10**400)
            finite = False
        if not finite:
            raise self.error(label, f"must be a finite number, got {shorten(repr(v))}", node.line)
        if integer and (not isinstance(v, int)):
            raise self.error(label, f"expected an integer, got {v!r}", node.line)
        if positive and not v > 0:
            raise self.error(label, f"must be > 0, got {v!r}", node.line)
        if not positive and minimum is not None and not v >= minimum:
            raise self.error(label, f"must be >= {minimum:g}, got {v!r}", node.line)
        return v

    def string(self, field: str, base: Node | None = None, *, label: str | None = None,
               default: str | None = None) -> str:
        label = label or field
        node = self.node(field, base, None if default is not None else _MISSING, label)
        if node is None:
            return default  # type: ignore[return-value]
        if not isinstance(node.value, str) or not node.value:
            raise self.error(label, f"expected a non-empty string, got {shorten(repr(strip(node)))}",
                             node.line)
        return node.value


def shorten(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters: an error stays one readable line."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def decode_utf8(data: bytes, source: str, first_line: int = 1, *, bom: bool = True) -> str:
    """``data`` (from line ``first_line`` of ``source`` on) as UTF-8 text, a leading byte
    order mark dropped (``bom``: the data starts the file); or an :class:`InputError` naming
    the line of the first byte that is not UTF-8 (a file saved as latin-1, say)."""
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:  # exc.object: ``data`` without its byte order mark
        raw = exc.object
        line = first_line + len(_LINE_BREAK.findall(raw, 0, exc.start))
        raise InputError(f"byte 0x{raw[exc.start]:02x} is not UTF-8 text (save the file as "
                         "UTF-8)", source=source, line=line) from None


_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def load_yaml(path: str | Path, text: str | None = None) -> Doc:
    """Parse a YAML file (or ``text``) into a line-aware :class:`Doc`."""
    source = str(path)
    if text is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read file ({exc.strerror})", source=source) from exc
        text = decode_utf8(data, source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InputError(f"invalid YAML: {exc.problem}", source=source, line=line) from exc
    if root is None:
        raise InputError("file is empty", source=source)
    return Doc(_convert(root, source), source)
