"""Load YAML while remembering the line of every key and list item.

PyYAML's node tree carries marks; we build a map from a field path such as
``("links", "code")`` or ``("authors", 2)`` to its 1-based line so that schema
errors can point at the line a contributor has to edit.

Catalog files are small, hand-written data, so anything a hostile or broken file
could use to exhaust the machine is refused before values are built: aliases
(``*name``, the "billion laughs" expansion), nesting deeper than an entry ever
needs, and values that cannot be constructed (``!!int "abc"``, a 5,000-digit
integer). Dates stay strings: the schema parses them and reports a bad one
(``2024-02-30``) at its line like any other field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

Path_ = tuple[str | int, ...]

# libyaml's parser when PyYAML was built with it: about 15x faster on the catalog.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# An entry nests three levels (errata -> item -> field); a few more are allowed so
# that a misplaced indent is reported by the schema, not here.
MAX_DEPTH = 12
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class YamlSyntaxError(ValueError):
    def __init__(self, line: int, message: str):
        self.line = line
        super().__init__(message)


@dataclass
class LocatedYaml:
    """The data of one document, and its node tree to find the line of any field.

    Lines are looked up only when a problem is reported, so a valid file costs
    no line bookkeeping at all.
    """

    data: object
    text: str = ""
    duplicate_keys: list[tuple[Path_, int]] = field(default_factory=list)
    _root: yaml.Node | None = field(default=None, repr=False)

    def line_of(self, path: Path_) -> int:
        """Line of ``path``, or of its nearest ancestor that exists in the file.

        A mapping's field is on its key's line; a list item on the item's first line.
        The node tree is composed again on the first look-up: holding thousands of
        trees between loading and reporting would cost more (in garbage collection)
        than composing one file again when it has a problem.
        """
        if self._root is None and self.text:
            self._root = yaml.compose(self.text, Loader=_LOADER)
        node = self._root
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == part:  # the first of duplicate keys, as loaded
                        line, node = key_node.start_mark.line + 1, value_node
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if not 0 <= part < len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line


class _Constructor(yaml.constructor.SafeConstructor):
    """SafeConstructor that keeps dates as text: the schema parses (and reports) them."""


_Constructor.add_constructor(_TIMESTAMP, yaml.constructor.SafeConstructor.construct_scalar)
_VALUE_ERRORS = (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError)


class _LocatingConstructor(_Constructor):
    """Slow path, run only after a value failed to build: which node, at which line."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except _VALUE_ERRORS as exc:
            reason = str(exc).split("\n")[0].split(";")[0]
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {kind} value: {reason}", node.start_mark
            ) from exc


def load_located(text: str) -> LocatedYaml:
    """Parse one YAML document; raise YamlSyntaxError with the offending line."""
    located = LocatedYaml(data=None)
    try:
        node = yaml.compose(text, Loader=_LOADER)
        if node is not None:
            # Lines first: the walk refuses aliases and deep nesting before any value is
            # built, which is where an alias bomb would explode.
            located.text, located._root = text, node
            constructor = _Constructor()
            try:
                located.data = _walk(node, [], located, set(), constructor)
            except YamlSyntaxError:
                raise
            except _VALUE_ERRORS:
                _LocatingConstructor().construct_document(node)
                raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        reason = exc.problem or str(exc)
        if exc.context:
            reason = f"{exc.context}: {reason}"
        if "mapping values are not allowed" in reason:
            reason += " (quote a value that contains ': ')"
        raise YamlSyntaxError(line, f"invalid YAML: {reason}") from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(1, f"invalid YAML: {exc}") from exc
    except RecursionError as exc:  # libyaml composes iteratively; the pure-Python one does not
        raise YamlSyntaxError(1, f"nested too deeply (more than {MAX_DEPTH} levels)") from exc
    located._root = None  # see line_of
    return located


_PLAIN = {"tag:yaml.org,2002:str", _TIMESTAMP}
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"


def _walk(
    node: yaml.Node, path: list, out: LocatedYaml, seen: set[int], constructor: _Constructor
) -> object:
    """Build the value; refuse aliases of collections and nesting deeper than MAX_DEPTH
    before anything is built; record duplicate keys.

    Strings, plain mappings and lists are built here (most of an entry, and much faster
    than PyYAML's generic constructor); other tags go to the constructor. ``path`` is the
    field path so far, extended and restored in place.
    """
    if isinstance(node, yaml.ScalarNode):  # an alias of a scalar cannot grow
        return node.value if node.tag in _PLAIN else constructor.construct_object(node, True)
    if len(path) >= MAX_DEPTH:
        raise YamlSyntaxError(
            node.start_mark.line + 1,
            f"nested more than {MAX_DEPTH} levels deep; an entry nests at most 3",
        )
    if id(node) in seen:
        raise YamlSyntaxError(
            out.line_of(tuple(path)),
            "YAML aliases (*name) are not allowed in catalog files: write the value out",
        )
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        mapping: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlSyntaxError(
                    key_node.start_mark.line + 1,
                    "a key must be a plain name, not a list or mapping",
                )
            if key_node.tag == _MERGE:
                raise YamlSyntaxError(
                    key_node.start_mark.line + 1, "YAML merge keys (<<) are not allowed"
                )
            key = (
                key_node.value
                if key_node.tag in _PLAIN
                else constructor.construct_object(key_node, True)
            )
            if key in mapping:
                out.duplicate_keys.append(((*path, key_node.value), key_node.start_mark.line + 1))
                continue
            path.append(key_node.value)
            mapping[key] = _walk(value_node, path, out, seen, constructor)
            path.pop()
        return mapping if node.tag == _MAP else constructor.construct_object(node, True)
    items = []
    for index, item in enumerate(node.value):
        path.append(index)
        items.append(_walk(item, path, out, seen, constructor))
        path.pop()
    return items if node.tag == _SEQ else constructor.construct_object(node, True)
