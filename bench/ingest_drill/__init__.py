"""The ingest drill benchmark: the gateway under a 10k fleet's uploads, then the drill.

Runs, as separate processes, the real ``killswitch serve --insecure`` (SQLite), the
real ``killswitch ingest --insecure``, and ``killswitch-agent simulate --insecure
--ingest`` with N agents uploading every 30 s (split over ``--fleet-processes``
simulators, 2 by default: one cannot offer 10,000 agents' upload rate), with the
drill's faults at small shares and ``--truth``. A second small simulator
(``--id-prefix probe``, no ``--ingest``) only holds leases for the probe agents the
harness uploads as (its agents capture on a 10 s tick, not 1 s: what they capture is
never uploaded, and at 1 s the 10,000 of them took 0.8 of a core through the round).

First, before the fleet starts (the box holds the server, the sink and the probe
simulator's agents):

1. **one round at once**: one batch for each of ``--burst-agents`` agents (as many as
   the fleet by default) that only the round uploads as (the probe simulator holds
   their leases), sent as fast as the harness can; the time until the last is
   answered, after an untimed warm-up round that makes their files; ``--rounds``
   timed rounds (5 by default), the median standing for the side (one round's figure
   moved by 1.40-1.71x from run to run on 2026-12-05). The round is a
   throughput measure, so it runs where the load generator does not starve what it
   measures: until 22:50 UTC on 2026-12-04 it ran beside the 10,000-agent fleet, whose
   simulators took about 1.1 of the box's 2 cores; the same code then measured
   13.8 s and 23.7 s minutes apart (1.7x), a figure of the CPU left over, not of the
   gateway.

Then the fleet starts, and once it is steady (every agent capturing, then one full
upload interval):

2. **steady window**: batches landed per second (the sink's manifests), and the
   gateway's own authorization latency (its ``/metrics`` histogram
   ``killswitch_ingest_authorization_seconds``: upload in hand to verdict) and group
   commits, while probes time whole ``UploadBatch`` round trips (verdict and the
   sink's commit). The control server's ``AuthorizeBatches`` handling time comes from
   its own ``/metrics`` histogram.
3. **the drill** (product only): every fault strikes (SIGUSR1), the whole fleet is
   paused, and after three lease TTLs and two upload intervals the fault kind x server
   state table is read, with the sink audited for events captured after the pause and
   the truth checked (``tests.faults.checker``).

**The baseline** runs in the same invocation with the same control server, fleet,
probes and burst: only the gateway is replaced by ``bench.bare_sink`` (a grpc.aio
``UploadBatch`` that appends the batch to a file; no checks, no control plane, no
fsync). It prints figures, it asserts nothing. Run from the repository root::

    .venv/bin/python -m bench.ingest_drill --agents 10000
    .venv/bin/python -m bench.ingest_drill --agents 500 --lease-ttl 10   # a quick check
"""

# The modules, in the order a run uses them: ``processes`` (the server, the sinks, the
# fleet), ``run`` (one side: the round, the steady window), ``metrics`` (load and the
# /metrics histograms), ``drill`` (the pause and its verdicts), ``side`` (what a side
# measured), ``report``, and ``cli`` (the flags and ``main``, which ``__main__`` runs).
