"""Authentication and authorisation for every RPC, in one place.

The interceptor resolves the caller's ``Principal`` from its mTLS certificate
(or, on an insecure loopback-only development server, from the metadata claim
``x-killswitch-as: NAME:ROLE``), bounds the calls one identity may have in flight,
refuses revoked certificates, and checks the role against ``POLICY``. The cap
comes before any refusal is recorded, so one identity's refusals never queue more
than its cap of audit writes; refusals before authentication (no identity, a
revoked certificate) are only counted, for an aggregated audit entry.
A method missing from ``POLICY`` is denied to everyone: deny by default. Whatever an
admitted handler raises is answered by the error boundary
(``control.rpc.error_boundary``) from the same wrapper.
Finer checks (own laptop, own agent id, not one's own request) are made by the
plane, which sees the principal through ``current_principal()``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import Protocol

import grpc
import structlog

from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.identity import parse_role
from control.errors import KillswitchError
from control.errors import PermissionDenied
from control.errors import one_line
from control.rpc.handler_cache import Handler
from control.rpc.handler_cache import WrappingInterceptor
from control.wire import INSECURE_IDENTITY_HEADER

if TYPE_CHECKING:  # the boundary reads the caller from here
    from control.rpc.error_boundary import ErrorBoundary
    from control.rpc.error_boundary import FailedCall

log = structlog.get_logger("killswitch.rpc.authz")

DEFAULT_MAX_CALLS_PER_IDENTITY = 16

IC, APPROVER, SRE = Role.INCIDENT_COMMANDER, Role.APPROVER, Role.SRE
AGENT, EMPLOYEE, AUTOMATION = Role.AGENT, Role.EMPLOYEE, Role.AUTOMATION
INGEST, ADMIN = Role.INGEST, Role.ADMIN


@dataclass(frozen=True, slots=True)
class Rule:
    roles: frozenset[Role]
    # Mutating calls are audited when they fail as well as when they succeed.
    mutates: bool


def _rule(*roles: Role, mutates: bool) -> Rule:
    return Rule(frozenset(roles), mutates)


_OPERATOR = "/killswitch.v1.Operator/"
_RUNBOOKS = "/killswitch.v1.Runbooks/"
_READ = _rule(IC, APPROVER, SRE, mutates=False)

# The role x operation matrix. The README's table is checked against this one.
POLICY: Mapping[str, Rule] = {
    "/killswitch.v1.AgentControl/Connect": _rule(AGENT, mutates=True),
    # Only the ingest gateway asks whether a batch may land, for any agent: an agent
    # never authorizes its own upload. Not audited per call (hundreds a second); what
    # they find is violation evidence, written to the evidence ledger.
    "/killswitch.v1.Ingest/AuthorizeUpload": _rule(INGEST, mutates=False),
    "/killswitch.v1.Ingest/AuthorizeBatches": _rule(INGEST, mutates=False),
    "/killswitch.v1.Ingest/WatchUploads": _rule(INGEST, mutates=False),
    "/killswitch.v1.Ingest/RecordAccepted": _rule(INGEST, mutates=False),
    _OPERATOR + "CreateHold": _rule(IC, mutates=True),
    _OPERATOR + "RequestResume": _rule(IC, mutates=True),
    _OPERATOR + "EditResumeRequest": _rule(IC, mutates=True),
    _OPERATOR + "ApproveResume": _rule(APPROVER, mutates=True),
    _OPERATOR + "DenyResume": _rule(APPROVER, mutates=True),
    _OPERATOR + "ListResumeRequests": _READ,
    _OPERATOR + "ListHolds": _READ,
    _OPERATOR + "GetStatus": _READ,
    _OPERATOR + "ListAgents": _READ,
    _OPERATOR + "ListAudit": _rule(IC, SRE, mutates=False),
    _OPERATOR + "ExpectAgents": _rule(IC, mutates=True),
    _OPERATOR + "AcknowledgeViolation": _rule(IC, mutates=True),
    # The administrator issues and revokes identities and join tokens, and nothing else:
    # no pause, no approval. An incident commander may still cut off a stolen laptop.
    _OPERATOR + "CreateEnrollToken": _rule(IC, ADMIN, mutates=True),
    _OPERATOR + "RevokeCertificates": _rule(IC, ADMIN, mutates=True),
    _OPERATOR + "ListCertificates": _rule(IC, SRE, ADMIN, mutates=False),
    # A signed proof report of one hold, its audit excerpt included: for the people who
    # answer for the incident (the approver who signs off a resume, too).
    "/killswitch.v1.Reports/GetReport": _READ,
    _OPERATOR + "GetReadiness": _rule(IC, SRE, mutates=False),
    # Automation runs approved runbooks and nothing else; a wave that asks for a human
    # is confirmed by an incident commander. A drill pauses: only an incident commander
    # starts one without an approved RequestDrill (checked by the runner).
    _RUNBOOKS + "PlanRunbook": _rule(IC, APPROVER, SRE, AUTOMATION, mutates=False),
    _RUNBOOKS + "RequestDrill": _rule(IC, SRE, AUTOMATION, mutates=True),
    _RUNBOOKS + "StartRunbook": _rule(IC, AUTOMATION, mutates=True),
    _RUNBOOKS + "GetRunbookRun": _rule(IC, APPROVER, SRE, AUTOMATION, mutates=False),
    _RUNBOOKS + "ListRunbookRuns": _rule(IC, APPROVER, SRE, AUTOMATION, mutates=False),
    _RUNBOOKS + "AdvanceRunbook": _rule(IC, mutates=True),
    _RUNBOOKS + "AbortRunbook": _rule(IC, AUTOMATION, mutates=True),
    "/killswitch.v1.SelfService/ListMyLaptops": _rule(EMPLOYEE, mutates=False),
    "/killswitch.v1.SelfService/OptOut": _rule(EMPLOYEE, mutates=True),
    "/killswitch.v1.SelfService/OptIn": _rule(EMPLOYEE, mutates=True),
    "/killswitch.v1.Dashboard/CreateSession": _rule(IC, APPROVER, SRE, EMPLOYEE, mutates=False),
    # Standard services, so that grpc-health-probe and grpcurl work (with a certificate).
    "/grpc.health.v1.Health/Check": _rule(*Role, mutates=False),
    "/grpc.health.v1.Health/Watch": _rule(*Role, mutates=False),
    "/grpc.health.v1.Health/List": _rule(*Role, mutates=False),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _rule(
        IC, APPROVER, SRE, mutates=False
    ),
}

# What `killswitch ingest` serves on its own port: agents upload there, as themselves.
GATEWAY_POLICY: Mapping[str, Rule] = {
    "/killswitch.v1.IngestGateway/UploadBatch": _rule(AGENT, mutates=False),
}

_current_principal: ContextVar[Principal] = ContextVar("killswitch_principal")


def current_principal() -> Principal:
    """The caller of the RPC being handled; only ever set by the interceptor."""
    return _current_principal.get()


def action_name(method: str) -> str:
    return method.removeprefix("/").removeprefix("killswitch.v1.").replace("/", ".")


def principal_from_claim(claim: str) -> Principal:
    """Development only: an insecure server takes the caller's word for who it is
    (``claim``: the value of its ``INSECURE_IDENTITY_HEADER``)."""
    name, colon, role = claim.partition(":")
    if not (colon and name.strip()):
        raise PermissionDenied(
            f"insecure server: send metadata {INSECURE_IDENTITY_HEADER}: NAME:ROLE"
        )
    return Principal(name.strip()[:100], parse_role(role.strip()))


class Authenticator:
    """Turns a call's transport credentials into a principal."""

    def __init__(
        self,
        *,
        insecure: bool,
        principal_from_pem: Callable[[bytes], Principal],
        is_revoked: Callable[[str], bool],
    ) -> None:
        self._insecure = insecure
        self._from_pem = principal_from_pem
        self.is_revoked = is_revoked

    def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """Who the caller's certificate (or claim) names; revocation is checked apart."""
        if self._insecure:
            claim = ""  # the last one sent, if sent twice; no dict of every header per call
            for key, value in context.invocation_metadata() or ():
                if key == INSECURE_IDENTITY_HEADER:
                    claim = str(value)
            return principal_from_claim(claim)
        certs = list(context.auth_context().get("x509_pem_cert") or [])
        if not certs:  # TLS already demanded one; this is defence in depth
            raise PermissionDenied("no client certificate")
        return self._from_pem(certs[0])


class RefusalRecorder(Protocol):
    async def record_denial(self, by: Principal, action: str, why: str) -> None:
        """An authenticated caller refused: audited (within its refusal budget)."""

    def count_unauthenticated(
        self, by: Principal | None, source: str, action: str, why: str
    ) -> None:
        """A caller refused before authentication: counted, never awaited."""


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``: the source address, without its port."""
    kind, _, address = peer.partition(":")
    if kind == "ipv6":
        return address.rpartition("]")[0].removeprefix("[") or address
    if kind == "ipv4":
        return address.rpartition(":")[0] or address
    return peer  # unix sockets and the like: the whole name is the source


class AuthorizationInterceptor(WrappingInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        refusals: RefusalRecorder,
        *,
        errors: ErrorBoundary,
        policy: Mapping[str, Rule] = POLICY,
        max_calls_per_identity: int = DEFAULT_MAX_CALLS_PER_IDENTITY,
        unchecked: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._refusals = refusals
        self._policy = policy
        self._max_calls = max_calls_per_identity
        self._unchecked = unchecked
        self._in_flight: dict[str, int] = {}
        self._errors = errors

    def _covers(self, method: str, handler: Handler) -> bool:
        return method not in self._unchecked

    def _wrap(self, method: str, handler: Handler) -> Handler:
        rule = self._policy.get(method)
        failed = self._errors.for_call(method, handler, mutates=rule is not None and rule.mutates)
        return _wrap(handler, lambda behaviour: self._guarded(method, behaviour, failed))

    def _guarded(
        self, method: str, behaviour: Callable[..., Any], failed: FailedCall
    ) -> Callable[..., Any]:
        """``behaviour`` behind the checks, its exceptions answered by ``failed`` (the
        error boundary) in the same frame: nothing more per call than a try/except."""
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                principal, key = await self._enter(method, context)
                try:
                    await self._authorise(method, principal, context)
                    await self._refuse_if_undecodable(method, request, context)
                    async for response in behaviour(request, context):
                        yield response
                except Exception as error:
                    await failed(error, request, context)
                finally:
                    self._release(key)

            return streaming

        async def unary(request: Any, context: Any) -> Any:
            principal, key = await self._enter(method, context)
            try:
                await self._authorise(method, principal, context)
                await self._refuse_if_undecodable(method, request, context)
                return await behaviour(request, context)
            except Exception as error:
                return await failed(error, request, context)
            finally:
                self._release(key)

        return unary

    async def _refuse_if_undecodable(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if isinstance(request, Undecodable):
            await self._refusals.record_denial(
                current_principal(), action_name(method), request.error
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)

    async def _enter(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Principal, str]:
        """Identify the caller and count the call against its cap, or abort it."""
        try:
            principal = self._authenticator.principal(context)
        except KillswitchError as exc:
            source = peer_host(context.peer())
            self._refusals.count_unauthenticated(None, source, action_name(method), one_line(exc))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, one_line(exc))
            raise AssertionError("unreachable: abort raises") from exc
        key = principal.serial or f"{principal.role.value}:{principal.name}"
        if self._in_flight.get(key, 0) >= self._max_calls:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{principal.describe()} already has {self._max_calls} calls in flight",
            )
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return principal, key

    async def _authorise(
        self, method: str, principal: Principal, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Refuse a revoked certificate or a role the policy does not name, else admit."""
        if principal.serial and self._authenticator.is_revoked(principal.serial):
            why = f"certificate {principal.serial} has been revoked"
            source = f"certificate {principal.serial}"
            self._refusals.count_unauthenticated(principal, source, action_name(method), why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        rule = self._policy.get(method)
        if rule is None or principal.role not in rule.roles:
            why = f"role {principal.role.value} may not call {action_name(method)}"
            log.warning("rpc_denied", method=method, principal=principal.describe())
            await self._refusals.record_denial(principal, action_name(method), why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        _current_principal.set(principal)

    def _release(self, key: str) -> None:
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
        else:
            del self._in_flight[key]


class Undecodable:
    """A request that does not parse: refused with INVALID_ARGUMENT, not gRPC's UNKNOWN."""

    def __init__(self, error: Exception) -> None:
        self.error = f"malformed request: the message does not parse ({type(error).__name__})"


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` answering ``Undecodable`` instead of raising (gRPC: UNKNOWN)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # any parse failure is the caller's, never ours
            return Undecodable(exc)

    return parse


def _wrap(handler: Handler, guard: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Handler:
    """The same handler with its behaviour run behind ``guard``."""
    make: Callable[..., Handler]
    behaviour: Any
    if handler.unary_unary:
        make, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        make, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        make, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        make, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return make(
        guard(behaviour),
        request_deserializer=tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )
