"""Who may do what, and the record of it: resume approvals, enrolment, certificates, audit.

The plane owns the fleet's state; this service owns the rules around changing it
that need two people or a certificate authority. Every decision goes to the
store together with its audit entry.
"""

from __future__ import annotations

from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TypeVar

import structlog

from control.domain import format_labels
from control.domain import validate_agent_id
from control.domain.approvals import OPEN_STATES
from control.domain.approvals import Ask
from control.domain.approvals import ResumeRequest
from control.domain.approvals import approve
from control.domain.approvals import check_drill_approval
from control.domain.approvals import check_runbook_approval
from control.domain.approvals import deny
from control.domain.approvals import edit_request
from control.domain.approvals import executed
from control.domain.approvals import open_drill_request
from control.domain.approvals import open_request
from control.domain.approvals import supersedes
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.history import request_archivable
from control.domain.identity import CertificateRecord
from control.domain.identity import EnrollToken
from control.domain.identity import IssuedToken
from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.identity import issue_enroll_token
from control.domain.identity import split_enroll_token
from control.domain.limits import RefusalSource
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import NotFound
from control.errors import PermissionDenied
from control.errors import StoreError
from control.errors import UnknownItem
from control.errors import one_line
from control.history import explain_unknown
from control.pki import Authority
from control.plane import ControlPlane
from control.refusals import RefusalLog
from control.store import LoadedState
from control.store import Store

log = structlog.get_logger("killswitch.governance")

T = TypeVar("T")

MAX_AUDIT_PAGE = 1000
MAX_AUDIT_SEQ = 2**63 - 1


class Governance:
    def __init__(
        self,
        plane: ControlPlane,
        store: Store,
        *,
        clock: Callable[[], float],
        authority: Authority | None,
        resync: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._plane = plane
        self._store = store
        self._clock = clock
        self._authority = authority
        # Re-reads what every replica shares (Replication.resync); None: nothing to read.
        self._resync_shared = resync
        self._requests: dict[str, ResumeRequest] = {}
        self._revoked: set[str] = set()
        # Started and stopped by the server, around the ports whose refusals it counts.
        self.refusals = RefusalLog(store.append_audit, clock)

    async def start(self, state: LoadedState) -> None:
        self._requests = {r.id: r for r in state.shared.resume_requests}
        self._revoked = set(state.shared.revoked)

    def adopt(self, requests: Sequence[ResumeRequest], revoked: Mapping[str, str]) -> None:
        """What other replicas decided: requests opened or approved there, revocations
        (``revoked``: serial -> subject), whose agents' live streams here end now."""
        for request in requests:
            known = self._requests.get(request.id)
            if known is None or supersedes(request, known):
                self._requests[request.id] = request
        for serial, subject in revoked.items():
            if serial in self._revoked:
                continue
            self._revoked.add(serial)
            closed = self._plane.close_stream(subject, "certificate revoked")
            log.info("revocation_adopted", serial=serial, subject=subject, stream_closed=closed)

    # ------------------------------------------------------------ audit

    async def record_denial(self, by: Principal, action: str, why: str) -> None:
        """Denied and failed calls are recorded too: probing is worth knowing about."""
        await self._refused(by, action, f"denied: {why}")

    async def record_failure(self, by: Principal, action: str, error: KillswitchError) -> None:
        verdict = "denied" if isinstance(error, PermissionDenied) else "failed"
        await self._refused(by, action, f"{verdict}: {error}")

    async def _refused(self, by: Principal, action: str, result: str) -> None:
        record = self._plane.audit.record(by, action, result=result)
        await self.refusals.refused(record, identity=by.serial or f"{by.role.value}:{by.name}")

    def count_unauthenticated(
        self, by: Principal | None, source: str, action: str, why: str
    ) -> None:
        """A call refused before anyone was authenticated: counted, audited in aggregate."""
        actor = "unauthenticated" if by is None else by.name
        role = "" if by is None else by.role.value
        self.refusals.count(RefusalSource(actor, role, source), f"{action}: {why}")

    async def read_audit(self, after_seq: int, limit: int) -> tuple[list[AuditEntry], ChainHead]:
        if after_seq > MAX_AUDIT_SEQ:
            raise InvalidInput(f"after_seq out of range: {after_seq}")
        return await self._store.read_audit(after_seq, min(limit or MAX_AUDIT_PAGE, MAX_AUDIT_PAGE))

    # ------------------------------------------------------------ resume requests

    def requests(
        self, request_id: str = "", *, include_closed: bool = False
    ) -> list[ResumeRequest]:
        if request_id:
            return [self._request(request_id)]
        now = self._clock()
        return sorted(
            (
                r
                for r in self._requests.values()
                if include_closed or r.current_state(now) in OPEN_STATES
            ),
            key=lambda r: r.created_at,
        )

    def runbook_approval(self, request_id: str, *, hold_id: str = "") -> ResumeRequest:
        """The approved for-runbook request a run may consume (checked, not yet consumed)."""
        request = self._request(request_id)
        check_runbook_approval(request, hold_id=hold_id, now=self._clock())
        return request

    def drill_approval(self, request_id: str, *, runbook: str, sha256: str) -> ResumeRequest:
        """The approved drill request a run may consume (checked, not yet consumed)."""
        request = self._request(request_id)
        check_drill_approval(request, runbook=runbook, sha256=sha256, now=self._clock())
        return request

    def consumed(self, request: ResumeRequest, epoch: int) -> None:
        """A run consumed the request in its own transaction; keep memory in step."""
        self._requests[request.id] = executed(request, epoch)

    def _request(self, request_id: str) -> ResumeRequest:
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownItem(UnknownItem.REQUEST, request_id) from None

    def forget_history(self, before: float) -> int:
        """Drop the requests the store archived (``HistoryCompactor``)."""
        gone = [r.id for r in self._requests.values() if request_archivable(r, before)]
        for request_id in gone:
            del self._requests[request_id]
        return len(gone)

    async def resync(self) -> bool:
        """Re-read the shared state now and adopt it; whether that worked.

        A hold or request another replica committed a moment ago is in the store before
        this replica hears of it: an operator naming it here must not be told it is
        unknown. Callers try once more after this, before saying so.
        """
        if self._resync_shared is None:
            return False
        try:
            await self._resync_shared()
        except StoreError as exc:
            log.warning("catch_up_failed", error=str(exc))
            return False
        return True

    async def found(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``; if it names a hold, request or run this replica does not know,
        once more after a re-read (``resync``): unknown to the store, not only here.
        Still unknown, the error says whether it is archived history
        (``explain_unknown``). Every door uses it (gRPC, the dashboard's forms, proof
        reports); lookups come before any change, so a call refused as unknown changed
        nothing."""
        try:
            return await call()
        except UnknownItem as unknown:
            return await self.found_after_resync(unknown, call)

    async def found_after_resync(self, unknown: UnknownItem, call: Callable[[], Awaitable[T]]) -> T:
        """The rest of ``found`` once a first ``call()`` raised ``unknown``: the RPC error
        boundary makes that first call itself, so a call that succeeds pays nothing."""
        try:
            if await self.resync():
                return await call()
        except UnknownItem as still:
            unknown = still
        raise await self.explain_unknown(unknown) from None

    async def explain_unknown(self, error: UnknownItem) -> NotFound:
        """A hold, request or run not in memory: archived history, or unknown indeed."""
        return await explain_unknown(self._store, error)

    async def request_resume(
        self,
        by: Principal,
        hold_id: str,
        reason: str,
        ticket: str,
        *,
        expires_in: float = 0.0,
        for_runbook: bool = False,
    ) -> ResumeRequest:
        hold = self._plane.hold(hold_id)
        now = self._clock()
        for other in self._requests.values():
            if other.hold_id == hold_id and other.current_state(now) in OPEN_STATES:
                raise Conflict(
                    f"resume request {other.id} for hold {hold_id} is already open;"
                    " edit it or let it expire"
                )
        ask = Ask(by, reason, ticket, now, expires_in)
        request = open_request(hold, ask, for_runbook=for_runbook)
        await self._save(request, by, "resume.request", "runbook" if for_runbook else "direct")
        return request

    async def request_drill(
        self,
        by: Principal,
        *,
        runbook: str,
        sha256: str,
        reason: str,
        ticket: str,
        expires_in: float = 0.0,
    ) -> ResumeRequest:
        ask = Ask(by, reason, ticket, self._clock(), expires_in)
        request = open_drill_request(ask, runbook=runbook, sha256=sha256)
        await self._save(request, by, "drill.request", f"start drill {runbook!r}")
        return request

    async def edit_request(
        self, by: Principal, request_id: str, reason: str, ticket: str
    ) -> ResumeRequest:
        request = self._request(request_id)
        edited = edit_request(request, by, reason=reason, ticket=ticket, now=self._clock())
        dropped = len(request.approvals)
        await self._save(
            edited, by, "resume.edit", f"revision {edited.revision}; {dropped} approvals dropped"
        )
        return edited

    async def approve(
        self, by: Principal, request_id: str, revision: int, note: str
    ) -> ResumeRequest:
        """A direct request lifts its hold in the same transaction as the approval."""
        approved = approve(
            self._request(request_id), by, revision=revision, note=note, now=self._clock()
        )
        if approved.for_runbook:
            what = f"to start drill {approved.drill_runbook!r}" if approved.for_drill else ""
            await self._save(approved, by, "resume.approve", what or "for a runbook")
            return approved
        record = self._audit(by, approved, "resume.approve", "hold lifted")
        hold = await self._plane.commit_lift(
            lambda at: self._store.execute_resume(approved, at, record), by.name
        )
        done = executed(approved, hold.lifted_epoch)
        self._requests[done.id] = done
        log.info("resume_approve", request_id=done.id, hold_id=done.hold_id, operator=by.name)
        return done

    async def deny(self, by: Principal, request_id: str, revision: int, note: str) -> ResumeRequest:
        denied = deny(
            self._request(request_id), by, revision=revision, note=note, now=self._clock()
        )
        await self._save(denied, by, "resume.deny", "")
        return denied

    def _audit(
        self, by: Principal, request: ResumeRequest, action: str, detail: str
    ) -> AuditRecord:
        subject = (
            f"drill {request.drill_runbook}" if request.for_drill else f"hold {request.hold_id}"
        )
        return self._plane.audit.record(
            by,
            action,
            target=f"{request.id} {subject}",
            reason=request.reason,
            ticket=request.ticket,
            detail=detail,
        )

    async def _save(self, request: ResumeRequest, by: Principal, action: str, detail: str) -> None:
        await self._store.save_resume_request(request, self._audit(by, request, action, detail))
        self._requests[request.id] = request
        log.info(
            action.replace(".", "_"),
            request_id=request.id,
            hold_id=request.hold_id,
            operator=by.name,
        )

    # ------------------------------------------------------------ enrolment

    async def create_enroll_token(
        self, by: Principal, *, uses: int, ttl: float, labels: Mapping[str, str]
    ) -> IssuedToken:
        issued = issue_enroll_token(
            uses=uses, ttl=ttl, created_by=by.name, now=self._clock(), labels=labels
        )
        pinned = f", pins {format_labels(issued.token.labels)}" if issued.token.labels else ""
        record = self._plane.audit.record(
            by,
            "enroll_token.create",
            target=issued.token.id,
            detail=f"{uses} uses, {ttl:g}s{pinned}",
        )
        await self._store.create_enroll_token(issued.token, record)
        return issued

    async def enroll(
        self, token: str, agent_id: str, csr_pem: str, *, source: str
    ) -> tuple[bytes, bytes]:
        """Trade a join token and a CSR for an agent certificate signed by the CA.

        The certificate is signed first but leaves the server only once the store has
        taken the token's use and recorded it as the agent's one valid certificate, in
        one transaction: a second enrolment of the id, here or on another replica, is
        refused there (``Store.enrol_agent``). Refusals are counted per ``source`` (the
        caller's address), not audited one by one: whoever calls this has proven nothing
        yet (``EnrolmentGate`` has already limited how often it may try).
        """
        authority = self._require_authority()
        try:
            claimant = Principal(validate_agent_id(agent_id), Role.AGENT)
            token_id, secret = split_enroll_token(token)
            cert_pem, cert = authority.sign_agent_csr(csr_pem, agent_id, now=self._clock())
            record = self._plane.audit.record(
                claimant,
                "agent.enroll",
                target=agent_id,
                detail=f"token {token_id}, serial {cert.serial}",
            )
            token_used = await self._store.enrol_agent(token_id, secret, cert, record)
        except KillswitchError as exc:
            self.count_unauthenticated(None, source, "Enrollment.Enroll", one_line(exc))
            raise
        # Before the agent has its certificate: it never connects unlabelled, where its
        # own first report would be trusted.
        await self._pin_token_labels(claimant, token_used, cert)
        log.info("agent_enrolled", agent_id=agent_id, serial=cert.serial, token_id=token_id)
        return cert_pem, authority.ca_pem

    async def _pin_token_labels(
        self, agent: Principal, token: EnrollToken, cert: CertificateRecord
    ) -> None:
        """The token's labels over whatever the server knew of the agent (its inventory
        entry): the operator who made the token chose them, not the agent. When they
        cannot be written the certificate, never handed out, is revoked, so that it
        does not block the agent's next attempt."""
        if not token.labels:
            return
        known = self._plane.agent_view(agent.name)
        labels = {**(known.labels if known else {}), **token.labels}
        try:
            await self._plane.expect_agents([(agent.name, labels)], agent, "agent.labels_pin")
        except KillswitchError as exc:
            await self.record_failure(agent, "Enrollment.Enroll", exc)
            why = "enrolment failed before the certificate was handed out"
            record = self._plane.audit.record(agent, "certs.revoke", target=cert.serial, reason=why)
            await self._store.revoke_certificates(cert.serial, self._clock(), record)
            raise
        log.info("agent_labels_pinned", agent_id=agent.name, token_id=token.id, labels=labels)

    def _require_authority(self) -> Authority:
        if self._authority is None:
            raise Conflict("this server runs without a CA (--insecure): it cannot enrol agents")
        return self._authority

    # ------------------------------------------------------------ certificates

    def is_revoked(self, serial: str) -> bool:
        return serial in self._revoked

    async def revoke(
        self, by: Principal, subject_or_serial: str, reason: str
    ) -> tuple[list[CertificateRecord], int]:
        record = self._plane.audit.record(
            by, "certs.revoke", target=subject_or_serial, reason=reason
        )
        revoked = await self._store.revoke_certificates(subject_or_serial, self._clock(), record)
        closed = 0
        for cert in revoked:
            self._revoked.add(cert.serial)
            if cert.role is Role.AGENT and self._plane.close_stream(
                cert.subject, "certificate revoked"
            ):
                closed += 1
        log.warning(
            "certificates_revoked",
            target=subject_or_serial,
            count=len(revoked),
            streams_closed=closed,
            operator=by.name,
        )
        return revoked, closed

    async def certificates(self) -> list[CertificateRecord]:
        return await self._store.list_certificates()
