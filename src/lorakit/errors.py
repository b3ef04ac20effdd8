"""The one exception type lorakit raises for bad input.

Every message is one line that names the problem and the fix. It subclasses ValueError so
callers that already catch ValueError keep working; the CLI turns it into exit code 2.
"""


class LorakitError(ValueError):
    """Bad input or an impossible request, described in one line."""


def merged_error(name: str, before: str) -> LorakitError:
    """Adapter `name` sits merged in the base weights, which `before` (what the caller was doing) needs
    unmerged: the one home of this message."""
    return LorakitError(f"adapter '{name}' is merged into the weights; call lorakit.unmerge(model) before {before}")
