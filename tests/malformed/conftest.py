"""One real ``killswitch serve`` with mTLS, shared by every module here.

Session-scoped, so each pytest-xdist worker starts it at most once, however the
modules' tests are shared out (as one module-scoped fixture did when this was one
module). Every test leaves it as it found it (``Fleet.assert_state_unchanged``).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from tests.conftest import ServerProcess
from tests.conftest import agent_identity
from tests.conftest import wait_for
from tests.malformed.calls import AGENT_CHANNEL_OPTIONS
from tests.malformed.calls import APPROVER
from tests.malformed.calls import CALL_TIMEOUT
from tests.malformed.calls import CROWD
from tests.malformed.calls import EMPLOYEE
from tests.malformed.calls import FUZZ_AGENT
from tests.malformed.calls import GOOD
from tests.malformed.calls import IC
from tests.malformed.calls import INGEST
from tests.malformed.calls import KA_AGENT
from tests.malformed.calls import KA_CONTROL
from tests.malformed.calls import LAPTOP
from tests.malformed.calls import NOBODY
from tests.malformed.calls import StreamingAgent
from tests.malformed.calls import secure_channel
from tests.malformed.fleet import Fleet


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("malformed")
    server = ServerProcess(root / "data", [])
    server.start()
    opened: list[grpc.Channel] = []
    good: StreamingAgent | None = None
    try:
        channels = {
            name: secure_channel(server, server.identity(name))
            for name in (IC, APPROVER, EMPLOYEE, INGEST)
        }
        for agent_id in (FUZZ_AGENT, CROWD, KA_AGENT, KA_CONTROL, GOOD):
            agent_identity(server, agent_id, root)
        for agent_id in (FUZZ_AGENT, CROWD):
            channels[agent_id] = secure_channel(server, root / agent_id, AGENT_CHANNEL_OPTIONS)
        opened.extend(channels.values())
        operator = pb_grpc.OperatorStub(channels[IC])
        # Every agent these modules ever connect is known up front, so no Hello adds one.
        operator.ExpectAgents(
            pb.ExpectAgentsRequest(
                agents=[
                    *(pb.ExpectedAgent(agent_id=a) for a in (GOOD, FUZZ_AGENT, KA_AGENT)),
                    pb.ExpectedAgent(agent_id=KA_CONTROL),
                    pb.ExpectedAgent(agent_id=LAPTOP, labels={"owner": EMPLOYEE}),
                ]
            ),
            timeout=CALL_TIMEOUT,
        )
        scope = pb.Scope(agents=pb.AgentIds(ids=[NOBODY]))
        incident = operator.CreateHold(
            pb.CreateHoldRequest(scope=scope, reason="fixture: paused for the fuzzing"),
            timeout=CALL_TIMEOUT,
        ).hold.id
        spare = operator.CreateHold(
            pb.CreateHoldRequest(scope=scope, reason="fixture: nobody asks to lift this one"),
            timeout=CALL_TIMEOUT,
        ).hold.id
        request_id = operator.RequestResume(
            pb.RequestResumeRequest(hold_id=incident, reason="fixture: an open request"),
            timeout=CALL_TIMEOUT,
        ).request.id
        opt_out = (
            pb_grpc.SelfServiceStub(channels[EMPLOYEE])
            .OptOut(pb.OptOutRequest(agent_id=LAPTOP, reason="fixture"), timeout=CALL_TIMEOUT)
            .hold.id
        )
        good = StreamingAgent(server, root / GOOD, GOOD)
        fleet = Fleet(server, channels, incident, spare, opt_out, request_id, good)
        wait_for(lambda: fleet.agent(GOOD).state == "CAPTURING", 15, "the good agent to capture")
        fleet.baseline = fleet.snapshot()
        yield fleet
    finally:
        if good is not None:
            good.close()
        for channel in opened:
            channel.close()
        server.stop()
