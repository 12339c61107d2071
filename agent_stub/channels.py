"""How an agent reaches its servers: addresses, channel options, replica failover.

Apart from the agent's protocol (``agent_stub.agent``) because the fleet simulator and
the CLI open channels too, and because failover is a decision about connections, not
about directives or leases.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Callable

import grpc

# Keepalive finds a dead server or a silently dropped connection within ~30 s.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]


# Each channel tries the server addresses in its own random order (gRPC's pick_first
# with shuffleAddressList), so a fleet spreads over the replicas, and the agents of a
# replica that dies spread over the survivors instead of stampeding onto one.
SHUFFLED_PICK_FIRST = json.dumps(
    {"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]}
)


class ServerAddressError(ValueError):
    """``--server`` is not a usable list of control server addresses."""


# Opens a fresh channel of an agent's own to the control server.
Reopen = Callable[[], grpc.aio.Channel]


def server_target(servers: str) -> str:
    """``HOST:PORT`` or ``IP:PORT,IP:PORT,...`` as one gRPC target.

    One DNS name that resolves to every replica works as it is; several addresses are
    given to gRPC's own ``ipv4:``/``ipv6:`` resolver, which fails over between them.
    """
    addresses = [a.strip() for a in servers.split(",") if a.strip()]
    if not addresses:
        raise ServerAddressError("no control server address given")
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ServerAddressError(f"bad server address {address!r}: expected HOST:PORT")
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host = address.rpartition(":")[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ServerAddressError(
                f"{address!r}: several addresses must be IP addresses; for names,"
                " use one DNS name that resolves to every replica"
            ) from None
    if len(families) > 1:
        raise ServerAddressError("several addresses must all be IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(addresses)}"


def open_channel(
    target: str,
    *,
    own_connection: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
    in_order: bool = False,
    named_as: str = "",
) -> grpc.aio.Channel:
    """A channel to the control server: mTLS with ``credentials``, else plaintext.

    ``target`` is what ``server_target`` returns. ``own_connection`` stops gRPC sharing
    one TCP link between channels. Several addresses are tried in a random order, or in
    the order given with ``in_order``; ``named_as`` (an address of the list) names the
    host TLS checks, the first address's by default.
    """
    options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
    if not in_order:
        options.append(("grpc.service_config", SHUFFLED_PICK_FIRST))
    if target.startswith(("ipv4:", "ipv6:")):
        # TLS checks every replica's certificate against one name: the first address's
        # host (replicas share a certificate whose SANs include it).
        first = named_as or target.partition(":")[2].split(",")[0]
        options.append(("grpc.default_authority", first.rpartition(":")[0]))
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


class ReplicaRotation:
    """An agent's ``reopen``: a fresh control channel, its replicas in an order of its own.

    Each agent shuffles the addresses once (so a fleet spreads over the replicas, and
    the agents of a replica that dies spread over the rest), and every fresh channel
    starts one further down its list: an agent that a replica sent away (it lost its
    database) tries another replica next. Reshuffling on every
    channel sent it back to the same replica half the time with two replicas, as
    often as its growing backoff allowed (tests/test_postgres_e2e.py, 2026-12-06: one
    agent of 12 still turned away after 90 s, twice). When a replica does not answer
    at all, gRPC's pick_first moves down the list by itself."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._target = target
        self._credentials = credentials
        scheme, _, listed = target.partition(":")
        several = target.startswith(("ipv4:", "ipv6:")) and "," in listed
        self._scheme = scheme
        self._addresses = listed.split(",") if several else []
        self._named_as = self._addresses[0] if several else ""
        (rng or random.Random()).shuffle(self._addresses)
        self._next = 0

    def __call__(self) -> grpc.aio.Channel:
        if not self._addresses:
            return open_channel(self._target, credentials=self._credentials)
        first, self._next = self._next, (self._next + 1) % len(self._addresses)
        order = self._addresses[first:] + self._addresses[:first]
        return open_channel(
            f"{self._scheme}:{','.join(order)}",
            credentials=self._credentials,
            in_order=True,
            named_as=self._named_as,
        )
