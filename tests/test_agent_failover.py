"""Agents given several control servers spread over them and fail over without a herd.

Three real mTLS servers that share one CA (as replicas do), enrolled simulated agents
given all three addresses, and `kill -9` of one server.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent_stub import channels as channels_module
from agent_stub.channels import ReplicaRotation
from agent_stub.channels import ServerAddressError
from agent_stub.channels import server_target
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import replica_of
from tests.conftest import wait_for

AGENTS = 60


def connected(server: ServerProcess) -> set[str]:
    return {a for a, row in Cli(server).agents().items() if row["connected"]}


def sharing_ca(first: ServerProcess, tmp_path: Path, name: str) -> ServerProcess:
    """Another replica: the same CA and server certificate, its own data."""
    return replica_of(first, tmp_path / name, [])


def test_agents_spread_over_replicas_and_the_dead_ones_agents_spread_over_the_rest(
    start_server: StartServer, simulate: Simulate, tmp_path: Path
) -> None:
    first = start_server()
    others = [sharing_ca(first, tmp_path, name) for name in ("replica-b", "replica-c")]
    try:
        for replica in others:
            replica.start()
        servers = [first, *others]
        addresses = ",".join(s.address for s in servers)
        simulate(first, AGENTS, "--server", addresses)

        def spread() -> list[set[str]] | None:
            sets = [connected(s) for s in servers]
            return sets if sum(map(len, sets)) == AGENTS and all(sets) else None

        before = wait_for(spread, 60, "every agent connected, each server with some")
        assert set().union(*before) == {f"laptop-{i:05d}" for i in range(AGENTS)}

        victim = servers[1]
        victim.kill9()
        survivors = [servers[0], servers[2]]

        def failed_over() -> list[set[str]] | None:
            sets = [connected(s) for s in survivors]
            return sets if sum(map(len, sets)) == AGENTS else None

        after = wait_for(failed_over, 60, "the dead server's agents on the survivors")
        moved = before[1]
        # Each survivor took some of them: a spread, not a stampede onto one.
        assert all(moved & survivor for survivor in after), (len(moved), [len(a) for a in after])
    finally:
        for replica in others:
            replica.stop()


@pytest.mark.parametrize(
    ("servers", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("control.example:50051", "control.example:50051"),
        ("10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
        ("[::1]:1, [::2]:2", "ipv6:[::1]:1,[::2]:2"),
    ],
)
def test_server_lists_become_one_grpc_target(servers: str, target: str) -> None:
    assert server_target(servers) == target


@pytest.mark.parametrize(
    ("servers", "problem"),
    [
        ("", "no control server"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:0", "expected HOST:PORT"),
        ("a.example:1,b.example:1", "one DNS name"),
        ("10.0.0.1:1,[::1]:1", "all be IPv4 or all IPv6"),
    ],
)
def test_bad_server_lists_are_refused(servers: str, problem: str) -> None:
    with pytest.raises(ServerAddressError, match=problem):
        server_target(servers)


def test_each_fresh_channel_starts_at_the_next_replica_and_tls_checks_one_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent a replica sent away must try another one next, not reshuffle and land on
    the same one again; every channel still checks the first address's name (the one in
    the replicas' certificate)."""
    opened: list[tuple[str, bool, str]] = []

    def recording(target: str, *, in_order: bool = False, named_as: str = "", **_: object) -> str:
        opened.append((target, in_order, named_as))
        return target

    monkeypatch.setattr(channels_module, "open_channel", recording)
    replicas = ["10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"]
    rotation = ReplicaRotation("ipv4:" + ",".join(replicas), rng=random.Random(4))
    orders = [str(rotation()).partition(":")[2].split(",") for _ in range(4)]
    assert len({order[0] for order in orders[:3]}) == 3 and orders[3] == orders[0]
    assert all(sorted(order) == replicas for order in orders)
    assert {(in_order, named_as) for _, in_order, named_as in opened} == {(True, replicas[0])}
    assert str(ReplicaRotation("replicas.example:443")()) == "replicas.example:443"
