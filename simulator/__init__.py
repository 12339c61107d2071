"""The fleet simulator: many reference agents in one process, some of them faulty.

It wraps the honest agent (``agent_stub``) through the seams it offers:
``faulty.SimulatedAgent`` misbehaves as its ``faults.Fault`` says once triggered and
tells ``truth.GroundTruth`` what it really did; ``fleet.Fleet`` runs thousands of them
and writes the ground truth the fault drills check (``--truth``); ``cli`` is the
``killswitch-agent`` program, ``simulate`` included. It imports nothing of the
control plane (``control``): the import contracts in pyproject.toml say so.
"""
