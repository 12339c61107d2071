"""control.untrusted: hostile documents are refused early, in one short line."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import yaml

from control import untrusted
from control.errors import MAX_SHOWN_CHARS
from control.errors import shown
from control.untrusted import MAX_DOCUMENT_BYTES
from control.untrusted import MAX_DOCUMENT_DEPTH
from control.untrusted import MAX_DOCUMENT_NODES
from control.untrusted import DocumentRefused
from control.untrusted import GuardedYamlLoader
from control.untrusted import load_json
from control.untrusted import off_loop
from tests.hostile_documents import HOSTILE
from tests.hostile_documents import alias_bomb

# The longest message a refusal here may have: a fixed sentence and one excerpt.
SHORT = 160


def compose(text: str) -> yaml.Node | None:
    loader = GuardedYamlLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def refusal(text: str) -> DocumentRefused:
    with pytest.raises(DocumentRefused) as caught:
        compose(text)
    assert len(str(caught.value)) < SHORT and "\n" not in str(caught.value)
    return caught.value


def test_a_plain_document_reads_as_safe_load_would() -> None:
    text = "a: [1, 2.5, {b: yes}]\n<<: {c: d}\n"
    loader = GuardedYamlLoader(text)
    root = loader.get_single_node()
    assert root is not None
    assert loader.construct_document(root) == yaml.safe_load(text)


def test_anchor_is_refused_even_unused() -> None:
    error = refusal("a: &x 1\nb: 2\n")
    assert (error.line, error.problem) == (
        1,
        "YAML anchors ('&x') are not allowed; write the value out",
    )


def test_alias_is_refused() -> None:
    error = refusal("a: 1\nb: *x\n")
    assert (error.line, error.problem) == (
        2,
        "YAML aliases ('*x') are not allowed; write the value out",
    )


def test_alias_bomb_is_refused_at_its_first_anchor() -> None:
    assert refusal(alias_bomb()).problem.startswith("YAML anchors ('&l0')")


def test_depth_cap_block_and_flow() -> None:
    at_cap = "[" * MAX_DOCUMENT_DEPTH + "]" * MAX_DOCUMENT_DEPTH
    assert compose(at_cap) is not None
    assert "nested over 20 levels" in refusal("[" + at_cap + "]").problem
    block = "".join(" " * i + "- \n" for i in range(MAX_DOCUMENT_DEPTH + 1))
    assert "nested over 20 levels" in refusal(block).problem
    assert "nested over 20 levels" in refusal("[" * 30_000).problem


def test_node_cap_counts_every_value() -> None:
    # The list itself is one node; the document stays under the byte cap.
    assert compose("[" + ", ".join(["1"] * (MAX_DOCUMENT_NODES - 1)) + "]") is not None
    error = refusal("[" + ", ".join(["1"] * MAX_DOCUMENT_NODES) + "]")
    assert error.problem == f"over {MAX_DOCUMENT_NODES} values; it must be short"


def test_byte_cap() -> None:
    assert compose("#" * (MAX_DOCUMENT_BYTES - 3) + "\na:") is not None
    error = refusal("#" * MAX_DOCUMENT_BYTES + "\n")
    assert error.problem.startswith("the document is over 32 KiB (32769 bytes)")
    # Counted in bytes, not characters.
    assert "over 32 KiB" in refusal("#" + "é" * (MAX_DOCUMENT_BYTES // 2)).problem


def test_numbers_too_long_to_mean_anything() -> None:
    assert "a number over 100 characters" in refusal("a: " + "1" * 5000).problem
    assert "a number over 100 characters" in refusal("a: 0x" + "f" * 4000).problem
    assert "a number over 100 characters" in refusal("a: !!float " + "9" * 400).problem
    assert compose("a: '" + "1" * 5000 + "'") is not None  # quoted: text, not a number


def test_refusals_quote_only_an_excerpt() -> None:
    long_name = "x" * 10_000
    error = refusal(f"a: &{long_name} 1\n")
    assert len(error.problem) < SHORT
    assert "x" * MAX_SHOWN_CHARS not in error.problem


def test_shown_quotes_an_excerpt_of_any_value() -> None:
    expanded = yaml.safe_load(alias_bomb(levels=6))["on_failure"]  # 9**6 values
    for value in (expanded, "y" * 100_000, 10**10_000, {"k": ["v"] * 1000}, b"z" * 100_000):
        assert len(shown(value)) <= MAX_SHOWN_CHARS, type(value)


def test_every_hostile_runbook_is_refused_quickly_in_one_line() -> None:
    for name, text in HOSTILE.items():
        with pytest.raises(DocumentRefused) as caught:
            compose(text)
        assert len(str(caught.value)) < SHORT, name


# ---------------------------------------------------------------- JSON


def test_json_within_the_caps() -> None:
    answer = {"status": "success", "data": {"resultType": "vector", "result": []}}
    assert load_json(json.dumps(answer).encode()) == answer


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"[" * 30_000, "nested over 20 levels deep"),
        (b"[" * 21 + b"]" * 21, "nested over 20 levels deep"),
        (b"[" + b",".join([b"0"] * MAX_DOCUMENT_NODES) + b"]", "has over 2000 values"),
        (b" " * (MAX_DOCUMENT_BYTES + 1), "is over 32 KiB"),
        (b"1" * 5000, "is not JSON"),
        (b"{'a': 1}", "is not JSON"),
        (b"\xff", "is not JSON"),
    ],
    ids=["deep-bomb", "deep", "wide", "large", "long-number", "not-json", "not-utf8"],
)
def test_json_refusals(data: bytes, problem: str) -> None:
    with pytest.raises(DocumentRefused) as caught:
        load_json(data, "the answer")
    message = str(caught.value)
    assert message.startswith("the answer ") and problem in message
    assert len(message) < SHORT


# ---------------------------------------------------------------- off the loop


def test_off_loop_runs_elsewhere_and_gives_the_answer() -> None:
    async def main() -> tuple[int, int]:
        return await off_loop(threading.get_ident), threading.get_ident()

    reader, loop = asyncio.run(main())
    assert reader != loop


def test_off_loop_refuses_what_takes_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(untrusted, "DOCUMENT_TIME_LIMIT_SECONDS", 0.05)
    release = threading.Event()

    async def main() -> None:
        await off_loop(release.wait, 10)

    try:
        with pytest.raises(DocumentRefused, match=r"took over 0.05 s"):
            asyncio.run(main())
    finally:
        release.set()
