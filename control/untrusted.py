"""Documents from callers (runbook YAML, a Prometheus answer): bounded before they are read.

A 421-byte runbook of nested YAML aliases ("billion laughs") once expanded to
millions of values and held the event loop for 12 s, incident commanders' calls
included. So every document the server parses from outside goes through here:

- **No anchors or aliases** (``&name``, ``*name``): they are how a few hundred bytes
  become millions of values, and a runbook has no need for them (write the value out).
- **Caps** on bytes, nodes (every scalar, list and mapping, keys included), nesting
  depth and the length of a number, checked *while* the text is read, so refusing a
  hostile document costs no more than reading the first part that breaks a cap.
- **Off the event loop, with a time limit** (``off_loop``): the caps bound the work,
  the thread therefore ends, and the caller hears ``INVALID_ARGUMENT`` in one line.

An error quotes at most ``errors.MAX_SHOWN_CHARS`` of an offending value, never all of it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import yaml

from control.errors import InvalidInput, shown

# A shipped runbook is 1-3 KiB, a Prometheus instant answer of one series under 1 KiB;
# 32 KiB also fits in one gRPC message (64 KiB) with room for the rest of the request.
MAX_DOCUMENT_BYTES = 32 * 1024
# The shipped five-wave runbook has 66 nodes; a 20-wave one with every gate about 600.
# PyYAML reads about 15k nodes a second, so this cap is also a bound on time.
MAX_DOCUMENT_NODES = 2_000
# A runbook nests 6 deep (waves, a wave, gates, prometheus, query); JSON answers 5.
MAX_DOCUMENT_DEPTH = 20
# Longer "numbers" mean nothing here, and past 4300 digits Python refuses to print them.
MAX_NUMBER_CHARS = 100
# Reading a capped runbook takes at most about 0.15 s; this bounds the rest (a busy host).
DOCUMENT_TIME_LIMIT_SECONDS = 2.0

T = TypeVar("T")

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# Few threads: a burst of hostile documents waits for them instead of taking every
# thread the process has; the time limit counts the wait too.
_readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="untrusted-document")


class DocumentRefused(InvalidInput):
    """A document over a cap, or written with a construct this server does not read."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem if line is None else f"line {line}: {problem}")
        self.problem = problem
        self.line = line


def check_size(data: str | bytes, what: str = "the document") -> None:
    size = len(data.encode("utf-8", "replace") if isinstance(data, str) else data)
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentRefused(
            f"{what} is over {MAX_DOCUMENT_BYTES // 1024} KiB ({size} bytes);"
            " it must be a short text"
        )


class GuardedYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases and keeps to the caps.

    The checks sit in ``compose_node``, which sees every node before it is built, so
    a hostile document is refused at its first offending node.
    """

    def __init__(self, text: str) -> None:
        check_size(text)
        super().__init__(text)
        self._nodes = 0
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: type[yaml.Token]) -> None:  # noqa: N803
        """The scanner reads ahead of the composer (``[`` may start a key), and across
        many open ``[`` it slows quadratically: refuse the depth here already."""
        if self.flow_level >= MAX_DOCUMENT_DEPTH:
            raise DocumentRefused(f"nested over {MAX_DOCUMENT_DEPTH} levels deep", self.line + 1)
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        anchor: str | None = getattr(event, "anchor", None)
        if anchor is not None:
            kind = "aliases" if isinstance(event, yaml.AliasEvent) else "anchors"
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise DocumentRefused(
                f"YAML {kind} ({shown(sign + anchor)}) are not allowed; write the value out", line
            )
        self._nodes += 1
        if self._nodes > MAX_DOCUMENT_NODES:
            raise DocumentRefused(f"over {MAX_DOCUMENT_NODES} values; it must be short", line)
        if self._depth >= MAX_DOCUMENT_DEPTH:
            raise DocumentRefused(f"nested over {MAX_DOCUMENT_DEPTH} levels deep", line)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if (
            isinstance(node, yaml.ScalarNode)
            and node.tag in (_INT_TAG, _FLOAT_TAG)
            and len(node.value) > MAX_NUMBER_CHARS
        ):
            raise DocumentRefused(
                f"a number over {MAX_NUMBER_CHARS} characters ({shown(node.value)})", line
            )
        return node


def load_json(data: bytes, what: str = "the document") -> Any:
    """``json.loads`` within the caps; the depth and node checks walk the parsed value,
    whose size the byte cap already bounds."""
    check_size(data, what)
    try:
        value = json.loads(data)
    except RecursionError:
        raise DocumentRefused(f"{what} is nested over {MAX_DOCUMENT_DEPTH} levels deep") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, a number too long to read
        raise DocumentRefused(f"{what} is not JSON: {shown(str(exc))}") from None
    nodes, depth, level = 0, 0, [value]
    while level:
        nodes, depth = nodes + len(level), depth + 1
        if depth > MAX_DOCUMENT_DEPTH:
            raise DocumentRefused(f"{what} is nested over {MAX_DOCUMENT_DEPTH} levels deep")
        if nodes > MAX_DOCUMENT_NODES:
            raise DocumentRefused(f"{what} has over {MAX_DOCUMENT_NODES} values")
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
    return value


async def off_loop(read: Callable[..., T], *args: Any) -> T:
    """``read(*args)`` in a reader thread, so the event loop keeps answering meanwhile;
    over ``DOCUMENT_TIME_LIMIT_SECONDS`` (waiting for a thread included) the caller is
    refused. The caps bound the work, so an abandoned thread still ends soon."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(
            loop.run_in_executor(_readers, read, *args), DOCUMENT_TIME_LIMIT_SECONDS
        )
    except TimeoutError:
        raise DocumentRefused(
            f"reading the document took over {DOCUMENT_TIME_LIMIT_SECONDS:g} s; make it shorter"
            " or try again"
        ) from None
