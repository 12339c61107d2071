"""The pure domain core: holds and scopes, effective desired state, compliance.

Nothing here performs I/O or imports gRPC, SQL or the scheduler; adapters
around it (``control.rpc``, ``control.store``, ``control.cli``) do that.
"""

from control.domain.compliance import (
    SETTLED,
    AgentStatus,
    CaptureReport,
    Compliance,
    CompliancePolicy,
    ComplianceState,
    UploadDecision,
    evaluate,
    fleet_compliant,
    is_settled,
)
from control.domain.desired import Desired, Mode, covering_holds, reconcile_desired
from control.domain.holds import (
    Hold,
    HoldDraft,
    HoldKind,
    draft_hold,
    opt_out_hold_id,
    validate_reason,
)
from control.domain.scope import (
    Scope,
    ScopeKind,
    format_labels,
    parse_label_pairs,
    parse_selector,
    validate_agent_id,
    validate_labels,
)

__all__ = [
    "SETTLED",
    "AgentStatus",
    "CaptureReport",
    "Compliance",
    "CompliancePolicy",
    "ComplianceState",
    "Desired",
    "Hold",
    "HoldDraft",
    "HoldKind",
    "Mode",
    "Scope",
    "ScopeKind",
    "UploadDecision",
    "covering_holds",
    "draft_hold",
    "evaluate",
    "fleet_compliant",
    "format_labels",
    "is_settled",
    "opt_out_hold_id",
    "parse_label_pairs",
    "parse_selector",
    "reconcile_desired",
    "validate_agent_id",
    "validate_labels",
    "validate_reason",
]
