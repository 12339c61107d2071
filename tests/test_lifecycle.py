"""The manager starts runnables in order, stops them in reverse, and undoes a failed start."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from control.lifecycle import Manager
from control.lifecycle import Runnable


async def _always() -> bool:
    return True


def _recording(names: list[str], calls: list[str], *, failing: str = "") -> Manager:
    manager = Manager(leads=_always)
    for name in names:

        async def start(name: str = name) -> None:
            if name == failing:
                raise RuntimeError(f"{name} cannot start")
            calls.append(f"start {name}")

        async def stop(name: str = name) -> None:
            calls.append(f"stop {name}")

        manager.add(Runnable(name, start, stop))
    return manager


def test_runnables_start_in_order_and_stop_in_reverse() -> None:
    calls: list[str] = []
    manager = _recording(["store", "plane", "grpc"], calls)

    async def scenario() -> None:
        await manager.start()
        await manager.stop()
        await manager.stop()  # twice: nothing left to stop

    asyncio.run(scenario())
    assert calls == [
        *("start store", "start plane", "start grpc"),
        *("stop grpc", "stop plane", "stop store"),
    ]
    assert manager.names == ["store", "plane", "grpc"]


def test_a_failed_start_stops_what_already_started_in_reverse() -> None:
    calls: list[str] = []
    manager = _recording(["store", "plane", "grpc", "http"], calls, failing="grpc")
    with pytest.raises(RuntimeError, match="grpc cannot start"):
        asyncio.run(manager.start())
    assert calls == ["start store", "start plane", "stop plane", "stop store"]


def test_a_failed_stop_does_not_keep_the_others_running() -> None:
    calls: list[str] = []
    manager = Manager(leads=_always)

    async def refuse() -> None:
        raise OSError("disk gone")

    async def stop_store() -> None:
        calls.append("stop store")

    manager.add(Runnable("store", stop=stop_store))
    manager.add(Runnable("checkpoints", stop=refuse))

    async def scenario() -> None:
        await manager.start()
        await manager.stop()

    asyncio.run(scenario())
    assert calls == ["stop store"]


def test_nothing_is_added_once_started() -> None:
    manager = Manager(leads=_always)
    asyncio.run(manager.start())
    with pytest.raises(RuntimeError, match="after start"):
        manager.add(Runnable("late"))


def test_leadership_changes_are_logged_with_what_needs_the_lead() -> None:
    answers = iter([False, True, True, False])

    async def leads() -> bool:
        return next(answers)

    manager = Manager(leads=leads)
    manager.add(Runnable("replication"))
    manager.add(Runnable("runbook runner", needs_leader=True))

    async def ask() -> list[bool]:
        return [await manager.leads() for _ in range(4)]

    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(ask()) == [False, True, True, False]
    assert [(entry["event"], entry["runnables"]) for entry in logs] == [
        ("leadership_acquired", ["runbook runner"]),
        ("leadership_lost", ["runbook runner"]),
    ]
