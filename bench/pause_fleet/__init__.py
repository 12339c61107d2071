"""Pause-a-fleet benchmark: how fast, and at what memory cost, the product pauses N agents.

Runs the real ``killswitch serve`` and ``killswitch-agent simulate`` as separate
processes, and, in the same run and topology, a bare grpc.aio push
(``bench.bare_server`` + ``bench.bare_fleet``) with no product logic. One
harness drives both through the Operator API, so the ratios product/baseline
show what the product adds on top of what gRPC itself costs on this machine.
Those two comparisons (``per-agent``, ``mux``) run the product with
``serve --insecure`` and ``simulate --insecure`` (plaintext, identities claimed
in metadata), as plaintext as the baseline.

The third comparison (``mtls``) runs the product as shipped: ``killswitch init``,
mTLS, every agent enrolled with a join token (before anything is timed; the
enrolment is timed on its own) and on its own TLS connection. Its baseline is the
same bare push over TLS with client certificates (``bench.bare_tls``: the product's
CA, key type and certificate chain, one certificate and connection per agent, issued
before the fleet starts, as it does not enrol); it is also set against the product
``--insecure`` with one connection per agent: that ratio is what mTLS costs the product.

Resuming takes two people, as in the product: ``ic-1`` requests, ``approver-1`` approves.

The product keeps its state in SQLite in a fresh data dir unless ``--database`` names a
PostgreSQL server: then every product run gets a fresh scratch database there, created
before and dropped after the run. ``--replicas N`` (N > 1 needs ``--database``) runs N
product servers on that one database, sharing one CA (mTLS) as replicas do; the fleet
is given every replica's address and each agent picks one. The pause is issued on
replica 0, and every replica's GetStatus is polled to see when it shows the whole fleet
paused, then verified. The baseline stays one bare server: the floor gRPC sets here.

It prints figures, it asserts nothing. Run from the repository root::

    .venv/bin/python -m bench.pause_fleet --agents 10000 --topology all --repeat 3
    .venv/bin/python -m bench.pause_fleet --agents 5000 --topology per-agent \\
        --database postgresql://postgres@127.0.0.1:5432/postgres --replicas 2
"""

# The modules, in the order a run uses them: ``systems`` (what is compared), ``site`` and
# ``postgres`` (where a system runs), ``run`` (its processes), ``conditions`` and
# ``phases`` (what is waited for and timed), ``results``, ``report``, and ``cli`` (the
# flags and ``main``, which ``__main__`` runs). The operator's calls and GetStatus polling
# are shared with the other benchmarks in ``bench.harness``.
