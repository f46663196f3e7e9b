"""Safe YAML loading that remembers where every node came from, so errors can say file:line:col."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, RecipeError

MAX_BYTES = 1024 * 1024
# A recipe has a few dozen nodes; these bounds only stop alias bombs and absurd nesting.
MAX_NODES = 100_000
MAX_DEPTH = 64

Loc = tuple[str | int, ...]


@dataclass
class Document:
    """Plain data from a YAML file, with the 1-based line/column of each value and mapping key."""

    file: str
    data: Any
    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    # Set when the file is a bare mergekit config that we nest under `merge:`.
    prefix: Loc = ()

    def position(self, loc: Loc, *, key: bool = False) -> tuple[int, int]:
        """Line and column of the node at `loc`, or of its nearest ancestor that exists."""
        loc = self._strip(tuple(loc))
        if key and loc in self.keys:
            return self.keys[loc]
        while loc:
            if loc in self.values:
                return self.values[loc]
            loc = loc[:-1]
        return self.values.get((), (1, 1))

    def display(self, loc: Loc) -> str:
        """`merge.models[1].parameters.weight` for ('merge', 'models', 1, 'parameters', 'weight')."""
        return format_loc(self._strip(tuple(loc)))

    def problem(self, loc: Loc, message: str, *, key: bool = False) -> Problem:
        """A Problem located at `loc` in this document."""
        line, col = self.position(loc, key=key)
        return Problem(self.file, line, col, self.display(loc), message)

    def _strip(self, loc: Loc) -> Loc:
        if self.prefix and loc[: len(self.prefix)] == self.prefix:
            return loc[len(self.prefix) :]
        return loc


def format_loc(loc: Loc) -> str:
    """Dotted path with [i] for list indices."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_document(path: str | Path, display_name: str | None = None) -> Document:
    """Read a YAML file into a Document; every failure is a RecipeError with file:line:col."""
    path = Path(path)
    name = display_name or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise _fail(name, 1, 1, f"file is {size:,} bytes; recipes are limited to 1 MiB")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(name, 1, 1, "no such file") from None
    except IsADirectoryError:
        raise _fail(name, 1, 1, "is a directory, not a recipe file") from None
    except PermissionError:
        raise _fail(name, 1, 1, "cannot be read: permission denied") from None
    return parse_document(raw, name)


def parse_document(raw: bytes | str, name: str) -> Document:
    """Parse YAML text into a Document (see load_document)."""
    import yaml

    if isinstance(raw, bytes):
        if len(raw) > MAX_BYTES:
            raise _fail(name, 1, 1, f"file is {len(raw):,} bytes; recipes are limited to 1 MiB")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise _fail(name, line, 1, "recipe is not UTF-8 text; save it as UTF-8") from None
    else:
        text = raw
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        root = yaml.compose(text, Loader=loader_cls)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = (exc.problem or exc.context or "invalid YAML").strip()
        raise _fail(name, line, col, f"YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise _fail(name, 1, 1, f"YAML error: {exc}") from None
    except RecursionError:
        raise _fail(name, 1, 1, f"YAML is nested too deeply (limit {MAX_DEPTH})") from None
    if root is None:
        raise _fail(name, 1, 1, "recipe is empty; expected a mapping of keys such as repo_id, sources, merge")
    doc = Document(name, None)
    builder = _Builder(doc)
    doc.data = builder.build(root, ())
    if not isinstance(doc.data, dict):
        line, col = _pos(root)
        raise _fail(name, line, col, f"recipe must be a mapping of keys, got {_kind(root)}")
    return doc


def _fail(name: str, line: int, col: int, message: str) -> RecipeError:
    return RecipeError([Problem(name, line, col, "", message)])


def _pos(node: Any) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _kind(node: Any) -> str:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return f"the scalar {node.value!r}" if node.value else "an empty value"
    return "a mapping"


class _Builder:
    """Turns a composed node graph into plain data, counting nodes so aliases cannot explode."""

    def __init__(self, doc: Document):
        import yaml.constructor

        self.doc = doc
        self.count = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: Any, loc: Loc, depth: int = 0) -> Any:
        import yaml

        self.count += 1
        if self.count > MAX_NODES:
            line, col = _pos(node)
            raise _fail(self.doc.file, line, col, f"document expands to more than {MAX_NODES:,} nodes (an alias bomb?)")
        if depth > MAX_DEPTH:
            line, col = _pos(node)
            raise _fail(self.doc.file, line, col, f"YAML is nested too deeply (limit {MAX_DEPTH})")
        self.doc.values.setdefault(loc, _pos(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._key(key_node)
                if key in out:
                    line, col = _pos(key_node)
                    raise _fail(self.doc.file, line, col, f"{format_loc((*loc, key))}: duplicate key '{key}'")
                self.doc.keys.setdefault((*loc, key), _pos(key_node))
                out[key] = self.build(value_node, (*loc, key), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i), depth + 1) for i, item in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            line, col = _pos(node)
            raise _fail(self.doc.file, line, col, f"{format_loc(loc)}: cannot read value {node.value!r}: {exc}") from None

    def _key(self, node: Any) -> str:
        import yaml

        line, col = _pos(node)
        if not isinstance(node, yaml.ScalarNode):
            raise _fail(self.doc.file, line, col, "mapping keys must be plain strings")
        if node.tag == "tag:yaml.org,2002:merge":
            raise _fail(self.doc.file, line, col, "YAML merge keys ('<<') are not supported in recipes; write the keys out")
        return str(node.value)
