"""The control plane's application service: the in-memory desired/observed state.

It owns the authoritative snapshot (epoch + holds), each agent's desired state and
observations, and the batched writer to the store. With several replicas on one
database, it also shows the agents another replica serves, from the rows that
replica writes: any replica gives the same per-laptop answer.

Its parts, each a module here (``ControlPlane`` composes them):

- ``cache``: the desired-state cache (epoch, holds, each agent's desired state) and
  its subscribers (agent streams, the ingest gateway's allowance watch);
- ``reports``: what each agent reports (ack, nack, heartbeat, lease, upload checks,
  violations);
- ``writer``: the batched writer of agent rows, their audit and decided labels;
- ``membership``: beats, store health, leasing and hand-over, other replicas' agents;
- ``holds``: hold commits, and adopting the ones other replicas committed;
- ``views``: read views and the census;
- ``audit``: audit records.

Two verbs for state from elsewhere, used the same way in every part and in
``control.replication``: *adopt* takes in state another replica or the store committed,
already read (``adopt_holds``, ``adopt_agents``, ``adopt_violations``, ``adopt_labels``);
*resync* reads it from the store now, then adopts it (``resync_holds``,
``resync_agent``). ``catch_up_to`` is neither: a guard that resyncs only when behind.
"""

from control.plane.cache import DirectiveSpec
from control.plane.control_plane import ControlPlane
from control.plane.entries import Subscriber
from control.plane.holds import EpochUnknown
from control.plane.holds import new_hold_id
from control.plane.membership import REPLICA_SILENT_BEATS
from control.plane.membership import STORE_PROBE_SECONDS
from control.plane.reports import LeaseDecision
from control.plane.views import SEVERITY
from control.plane.views import AgentFilter
from control.plane.views import AgentView
from control.plane.views import Census
from control.plane.views import StatusSummary

__all__ = [
    "REPLICA_SILENT_BEATS",
    "SEVERITY",
    "STORE_PROBE_SECONDS",
    "AgentFilter",
    "AgentView",
    "Census",
    "ControlPlane",
    "DirectiveSpec",
    "EpochUnknown",
    "LeaseDecision",
    "StatusSummary",
    "Subscriber",
    "new_hold_id",
]
