"""``killswitch ingest``: the reference ingest gateway, where agents' captured data lands.

Its own process and port: agents upload batches with their own certificates; every
batch is checked locally (sequence, clock, size) and with the control plane (role
``ingest``) before it is written to a private, append-only sink. No answer from the
control plane means no batch is accepted.
"""
