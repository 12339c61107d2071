"""Documents from callers (runbook YAML, a Prometheus answer): bounded before they are read.

A ~400-byte runbook of nested YAML aliases ("billion laughs") once expanded to
millions of values and held the event loop for 12 s, incident commanders' calls
included. So every document the server parses from outside goes through here:

- **No anchors or aliases** (``&name``, ``*name``): they are how a few hundred bytes
  become millions of values, and a runbook has no need for them (write the value out).
- **Caps** on bytes, nodes (every scalar, list and mapping, keys included), nesting
  depth and the length of a number, checked on libyaml's event stream before any
  node is built, so refusing a hostile document costs no more than parsing up to its
  first offending part (milliseconds). PyYAML's pure-Python parser is 20 times
  slower and, while it holds the GIL, slows the event loop too; only its error
  checks for unprintable characters are used.
- **Off the event loop, with a time limit** (``off_loop``): the caps bound the work,
  the thread therefore ends, and the caller hears ``INVALID_ARGUMENT`` in one line.

An error quotes at most ``errors.MAX_SHOWN_CHARS`` of an offending value, never all of it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from typing import TypeVar

import yaml

from control.errors import InvalidInput
from control.errors import shown

# A shipped runbook is 1-3 KiB, a Prometheus instant answer of one series under 1 KiB;
# 32 KiB also fits in one gRPC message (64 KiB) with room for the rest of the request.
MAX_DOCUMENT_BYTES = 32 * 1024
# The shipped five-wave runbook has 66 nodes; a 20-wave one with every gate about 600.
# Also a bound on the Python work after parsing (construction, schema, checks).
MAX_DOCUMENT_NODES = 2_000
# A runbook nests 6 deep (waves, a wave, gates, prometheus, query); JSON answers 5.
MAX_DOCUMENT_DEPTH = 20
# Longer "numbers" mean nothing here, and past 4300 digits Python refuses to print them.
MAX_NUMBER_CHARS = 100
# Reading a capped runbook takes at most about 40 ms; this bounds the rest (a busy host).
DOCUMENT_TIME_LIMIT_SECONDS = 2.0

T = TypeVar("T")

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_RESOLVER = yaml.resolver.Resolver()
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


class GuardedYamlLoader(yaml.CSafeLoader):
    """``yaml.CSafeLoader`` (libyaml, about 20 times faster than PyYAML's own parser)
    for a document that first passed ``screen_yaml``: no anchors or aliases, within
    the caps. The nodes keep their line marks; construction is ``safe_load``'s."""

    def __init__(self, text: str) -> None:
        screen_yaml(text)
        super().__init__(text)


def screen_yaml(text: str) -> None:
    """Read the parser's events once, in order, and stop at the first one that breaks a
    rule, so refusing costs what reading up to it costs. YAML syntax errors are
    raised as PyYAML's own exceptions."""
    check_size(text)
    yaml.reader.Reader(text)  # PyYAML's check for unprintable characters (ReaderError)
    parser = yaml.CSafeLoader(text)
    nodes = depth = 0
    try:
        while (event := parser.get_event()) is not None:
            line = event.start_mark.line + 1 if event.start_mark is not None else None
            if isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if not isinstance(event, yaml.NodeEvent):
                continue
            if event.anchor is not None:
                alias = isinstance(event, yaml.AliasEvent)
                sign, kind = ("*", "aliases") if alias else ("&", "anchors")
                raise DocumentRefused(
                    f"YAML {kind} ({shown(sign + event.anchor)}) are not allowed;"
                    " write the value out",
                    line,
                )
            nodes += 1
            if nodes > MAX_DOCUMENT_NODES:
                raise DocumentRefused(f"over {MAX_DOCUMENT_NODES} values; it must be short", line)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DOCUMENT_DEPTH:
                    raise DocumentRefused(f"nested over {MAX_DOCUMENT_DEPTH} levels deep", line)
            if isinstance(event, yaml.ScalarEvent) and _long_number(event):
                raise DocumentRefused(
                    f"a number over {MAX_NUMBER_CHARS} characters ({shown(event.value)})", line
                )
    except yaml.MarkedYAMLError as exc:
        if "maximum nesting depth" not in (exc.problem or ""):
            raise
        # libyaml reads ahead (a "[" may start a key) and stops at 1000 levels itself.
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        raise DocumentRefused(f"nested over {MAX_DOCUMENT_DEPTH} levels deep", line) from None
    finally:
        parser.dispose()


def _long_number(event: yaml.ScalarEvent) -> bool:
    if len(event.value) <= MAX_NUMBER_CHARS:
        return False
    tag = event.tag if event.tag not in (None, "!") else None
    if tag is None and event.implicit[0]:
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, (True, False))  # type: ignore[no-untyped-call]
    return tag in (_INT_TAG, _FLOAT_TAG)


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
