"""Hostile runbooks, shared by tests/test_hostile_documents.py and bench/hostile_documents.py.

Each is small enough for one gRPC message and was costly before ``control.untrusted``.
"""

from __future__ import annotations


def alias_bomb(levels: int = 8) -> str:
    """Nested aliases ("billion laughs"): 384 bytes that expand to 9**8 values.

    Put where the schema complains about the whole value (``on_failure`` must be one
    word), it once cost the server 12 s of its event loop rendering the error."""
    rows = ["&l0 [" + ",".join(["lol"] * 9) + "]"]
    rows += [f"&l{n} [{','.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return f"name: bomb\non_failure: [{','.join(rows)}]\nwaves: [{{share: 100%}}]\n"


def deep_bomb(depth: int = 10_000) -> str:
    """Flow lists nested far past the recursion limit."""
    return "name: bomb\nwaves: " + "[" * depth + "]" * depth + "\n"


def wide_bomb(values: int = 15_000) -> str:
    """Many tiny values: under the byte cap, but many nodes to build and validate."""
    return "name: bomb\nwaves: [" + ",".join(["0"] * values) + "]\n"


def oversized(size: int = 60 * 1024) -> str:
    """A plain valid runbook padded with a comment, over the byte cap, under the
    transport's 64 KiB message cap."""
    text = "name: big\nwaves: [{share: 100%}]\n"
    return text + "#" * (size - len(text) - 1) + "\n"


HOSTILE = {
    "alias-bomb": alias_bomb(),
    "deep-nesting": deep_bomb(),
    "many-values": wide_bomb(),
    "oversized": oversized(),
}
