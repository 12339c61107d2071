#!/usr/bin/env bash
# Database load of one control-server replica on PostgreSQL with N simulated agents
# (default 5,000, plaintext over 8 connections): transactions and row writes in 60 idle
# seconds, then in one fleet-wide pause until every agent is verified stopped.
# Usage: bash bench/db_load.sh [N]   (needs PostgreSQL on 127.0.0.1:5432, trust auth)
set -euo pipefail
N=${1:-5000}
DB=ks_sizing_$$
psql -qh 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $DB" 
DSN="postgresql://postgres@127.0.0.1:5432/$DB"
D=$(mktemp -d)
stat() { psql -Atqh 127.0.0.1 -U postgres -d postgres -c "select xact_commit, tup_inserted+tup_updated from pg_stat_database where datname='$DB'"; }
.venv/bin/killswitch serve --data-dir $D --insecure --grpc 127.0.0.1:57051 --http 127.0.0.1:57080 --database $DSN --log-level warning > $D/server.log 2>&1 &
SERVER=$!
sleep 4
.venv/bin/killswitch-agent simulate --server 127.0.0.1:57051 --agents $N --insecure --connections 8 --report-every 3600 > $D/sim.log 2>&1 &
SIM=$!
export KILLSWITCH_SERVER=127.0.0.1:57051
until [ "$(.venv/bin/killswitch status --insecure --as sre-1:sre --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["agents"]["by_state"].get("CAPTURING",0))')" -ge "$N" ]; do sleep 2; done
echo "connected: $N agents; server RSS $(ps -o rss= -p $SERVER) KiB"
sleep 70   # let first-connect writes settle (last_seen rows are rewritten at most once a minute)
a=($(stat | tr '|' ' ')); sleep 60; b=($(stat | tr '|' ' '))
echo "idle 60 s: $(( (b[0]-a[0]) )) transactions, $(( (b[1]-a[1]) )) row writes"
a=($(stat | tr '|' ' '))
.venv/bin/killswitch pause --insecure --as ic-1:incident-commander --all --reason sizing --wait --timeout 120 >/dev/null
b=($(stat | tr '|' ' '))
echo "pause to all verified stopped: $(( (b[0]-a[0]) )) transactions, $(( (b[1]-a[1]) )) row writes"
kill $SIM; sleep 2; kill $SERVER; wait $SERVER 2>/dev/null || true
psql -qh 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE $DB WITH (FORCE)"
rm -rf $D
