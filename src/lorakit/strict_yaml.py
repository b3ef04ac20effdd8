"""The YAML loader behind io.read_yaml: yaml.SafeLoader plus three refusals.

- an alias (`*name`, including `<<: *name` merges): nine lines of nested aliases expand to 10^9
  values (the "billion laughs"), and a settings file never needs one;
- a key given twice in one mapping (SafeLoader keeps the last one silently);
- nesting deeper than io.MAX_JSON_DEPTH (the composer recurses once per level).
Scalars read as in YAML 1.2: only true/false are booleans (YAML 1.1 also turns yes/no/on/off into
booleans, so `bf16: on` would silently be True), and 1e-3 is a number (YAML 1.1 wants 1.0e-3 and
reads 1e-3 as a string).
Imported only when a YAML file is read, so `import lorakit` does not need PyYAML.
"""

from __future__ import annotations

import re

import yaml

from .io import MAX_JSON_DEPTH


class Refused(ValueError):
    """The file is valid YAML but not a plain settings file; the message names the line and the fix."""


def _line(node_or_mark) -> int:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return mark.line + 1


class StrictLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise Refused(f"line {_line(event)} uses the alias *{event.anchor}; write the value out instead")
        self._depth += 1
        if self._depth > MAX_JSON_DEPTH:
            raise Refused(
                f"line {_line(self.peek_event())} nests deeper than {MAX_JSON_DEPTH} levels; settings are flat "
                "values or short lists"
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:
                raise Refused(f"line {_line(key_node)} has a list or mapping as a key; keys are names") from None
            if repeated:
                raise Refused(f"line {_line(key_node)} repeats the key {key!r}; keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
StrictLoader.add_implicit_resolver(_FLOAT, re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789"))
