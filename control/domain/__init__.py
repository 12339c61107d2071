"""The pure domain core: holds and scopes, effective desired state, compliance.

Nothing here performs I/O or imports gRPC, SQL or the scheduler; adapters
around it (``control.rpc``, ``control.store``, ``control.cli``) do that.
"""

from control.domain.compliance import SETTLED
from control.domain.compliance import AgentStatus
from control.domain.compliance import CaptureReport
from control.domain.compliance import Compliance
from control.domain.compliance import CompliancePolicy
from control.domain.compliance import ComplianceState
from control.domain.compliance import UploadDecision
from control.domain.compliance import evaluate
from control.domain.compliance import fleet_compliant
from control.domain.compliance import is_settled
from control.domain.desired import Desired
from control.domain.desired import Mode
from control.domain.desired import covering_holds
from control.domain.desired import reconcile_desired
from control.domain.holds import Hold
from control.domain.holds import HoldDraft
from control.domain.holds import HoldKind
from control.domain.holds import draft_hold
from control.domain.holds import opt_out_hold_id
from control.domain.holds import validate_reason
from control.domain.scope import Scope
from control.domain.scope import ScopeKind
from control.domain.scope import format_labels
from control.domain.scope import parse_label_pairs
from control.domain.scope import parse_selector
from control.domain.scope import validate_agent_id
from control.domain.scope import validate_labels

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
