"""``yaml.safe_load`` that refuses, before building anything, documents too deep or whose aliases explode."""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_YAML_DEPTH = 32  # nesting of mappings and lists in one document
MAX_YAML_EXPANDED = 1 << 21  # characters of a document once its aliases are expanded (billion laughs)


class YAMLLimitError(ValueError):
    """A YAML document is nested too deeply or its aliases expand too far."""


DEEP = f"nested deeper than {MAX_YAML_DEPTH} levels; give sections and keys, not deep structures"
_DEEP_FLOW = re.compile(r"[\[{](?:\s*[\[{]){%d}" % MAX_YAML_DEPTH)  # more than MAX_YAML_DEPTH brackets opened in a row


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader counting, while composing, the depth and the expanded size of each node."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its expanded size (aliases reuse the node)

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(DEEP)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:
            if isinstance(node, yaml.ScalarNode):
                size = 1 + len(node.value)
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else [c for kv in node.value for c in kv]
                size = 1 + sum(self._sizes.get(id(c), 1) for c in children)
            self._sizes[id(node)] = size
            if size > MAX_YAML_EXPANDED:
                raise YAMLLimitError(f"aliases (*name) expand to more than {MAX_YAML_EXPANDED:,} characters; "
                                     "write the values out instead of repeating aliases")
        return node


def load_bounded_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``; :class:`YAMLLimitError` beyond the depth and alias-expansion limits."""
    if _DEEP_FLOW.search(text):  # refused before PyYAML's scanner looks ahead over the brackets
        raise YAMLLimitError(DEEP)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    if getattr(e, "problem", None) and mark is not None:
        return f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())
