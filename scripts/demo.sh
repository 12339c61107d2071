#!/usr/bin/env bash
# The `make demo` fleet: one control server on SQLite and 1,000 simulated agents.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${KILLSWITCH_DEMO_DATA:-demo-data}
GRPC=${KILLSWITCH_DEMO_GRPC:-127.0.0.1:50051}
HTTP=${KILLSWITCH_DEMO_HTTP:-127.0.0.1:8080}
AGENTS=${KILLSWITCH_DEMO_AGENTS:-1000}
mkdir -p "$DATA"
IDS="$DATA/identities"

cleanup() {
  trap - EXIT INT TERM
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  echo "demo stopped; state kept in $DATA/ (delete it to start fresh)"
  exit 0
}
trap cleanup EXIT INT TERM

# mTLS is the default: a private CA, a server certificate and one identity per role.
if [ ! -f "$DATA/pki/ca.pem" ]; then
  "$BIN/killswitch" init --data-dir "$DATA"
fi

"$BIN/killswitch" serve --data-dir "$DATA" --grpc "$GRPC" --http "$HTTP" --log-format json \
  2>>"$DATA/server.log" &
server=$!
for _ in $(seq 100); do
  if "$BIN/killswitch" status --server "$GRPC" --identity "$IDS/sre-1" >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the control server did not start; see $DATA/server.log:" >&2
    tail -n 5 "$DATA/server.log" >&2
    exit 1
  fi
  sleep 0.2
done

# Agents enrol once with a join token, then connect with their own certificates.
token=$("$BIN/killswitch" enroll-token create --server "$GRPC" --identity "$IDS/ic-1" \
  --uses "$AGENTS" --ttl 600 2>/dev/null)
"$BIN/killswitch-agent" simulate --server "$GRPC" --agents "$AGENTS" --report-every 15 \
  --enroll-token "$token" --ca "$DATA/pki/ca.pem" --state-dir "$DATA/agents" &

cat <<EOT

  Control server on $GRPC (state in $DATA/, log in $DATA/server.log), $AGENTS simulated agents.
  In another terminal:

    export KILLSWITCH_SERVER=$GRPC KILLSWITCH_IDENTITY=$IDS/ic-1   # incident commander
    .venv/bin/killswitch pause --all --reason "data leak" --ticket INC-1 --wait
    .venv/bin/killswitch status
    .venv/bin/killswitch agents --state VERIFIED_STOPPED --selector region=eu-west
    .venv/bin/killswitch holds
    .venv/bin/killswitch resume --hold HOLD_ID --reason "leak contained"   # asks
    .venv/bin/killswitch approve REQUEST_ID --identity $IDS/approver-1     # a second person
    .venv/bin/killswitch audit verify --identity $IDS/sre-1
    .venv/bin/killswitch me --identity $IDS/employee-1                    # an employee's view
    .venv/bin/killswitch dashboard --identity $IDS/sre-1                  # web dashboard link
    curl -s http://$HTTP/metrics | grep '^killswitch_agents'              # Prometheus

  Ctrl-C stops everything.

EOT
wait
