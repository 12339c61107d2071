#!/usr/bin/env bash
# The `make demo` fleet: one control server on SQLite, the ingest gateway the agents upload
# to, and 1,000 simulated agents.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${KILLSWITCH_DEMO_DATA:-demo-data}
GRPC=${KILLSWITCH_DEMO_GRPC:-127.0.0.1:50051}
HTTP=${KILLSWITCH_DEMO_HTTP:-127.0.0.1:8080}
INGEST=${KILLSWITCH_DEMO_INGEST:-127.0.0.1:50061}
AGENTS=${KILLSWITCH_DEMO_AGENTS:-1000}
# People's own keys live apart from the server's data dir, as on their own machines.
IDS=${KILLSWITCH_DEMO_PEOPLE:-demo-people}
mkdir -p "$DATA" "$IDS"

cleanup() {
  trap - EXIT INT TERM
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  echo "demo stopped; state kept in $DATA/ (delete it to start fresh)"
  exit 0
}
trap cleanup EXIT INT TERM

# mTLS is the default: a root CA, an agent CA, a server certificate and one admin identity.
if [ ! -f "$DATA/pki/ca.pem" ]; then
  "$BIN/killswitch" init --data-dir "$DATA"
elif [ ! -f "$DATA/pki/agent-ca.pem" ]; then
  echo "$DATA/ predates per-person identities (no agent CA): delete it to start fresh" >&2
  exit 1
fi

# Each person makes their own key and request; the administrator signs it with the root
# key (here, where `init` left it; in production, on the administrator's machine).
issue() {  # NAME ROLE
  local dir="$IDS/$1"
  [ -f "$dir/cert.pem" ] && return
  rm -rf "$dir"
  "$BIN/killswitch" identity request --name "$1" --role "$2" --out "$dir" >/dev/null 2>&1
  "$BIN/killswitch" certs issue "$dir/request.csr" --role "$2" --data-dir "$DATA" \
    --out "$dir/cert.pem" 2>/dev/null
  cp "$DATA/pki/ca.pem" "$dir/ca.pem"
}
issue ic-1 incident-commander
issue approver-1 approver
issue approver-2 approver
issue sre-1 sre
issue ingest-1 ingest
issue employee-1 employee   # owns the first simulated laptop (label owner=employee-1)

# Tries CHECK every 0.2 s, 100 times at most; if process PID ends first, shows the end of
# its LOG and stops the demo.
wait_started() {  # WHAT PID LOG CHECK...
  local what=$1 pid=$2 log=$3
  shift 3
  for _ in $(seq 100); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the $what did not start; see $log:" >&2
      tail -n 5 "$log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

listening() {  # HOST:PORT: whether something there accepts a connection
  (exec 3<>"/dev/tcp/${1%:*}/${1##*:}")
}

"$BIN/killswitch" serve --data-dir "$DATA" --grpc "$GRPC" --http "$HTTP" --log-format json \
  2>>"$DATA/server.log" &
server=$!
wait_started "control server" "$server" "$DATA/server.log" \
  "$BIN/killswitch" status --server "$GRPC" --identity "$IDS/sre-1"

# The ingest gateway, when this build has one (`killswitch ingest`; before it, the agents
# only ask the control server and upload nowhere). It checks every batch with the control
# server as identity `ingest-1`, issued above.
upload=()
gateway="no ingest gateway in this build: agents upload nowhere"
if "$BIN/killswitch" ingest --help >/dev/null 2>&1; then
  "$BIN/killswitch" ingest --data-dir "$DATA/ingest" --listen "$INGEST" --control "$GRPC" \
    --identity "$IDS/ingest-1" 2>>"$DATA/ingest.log" &
  ingest=$!
  wait_started "ingest gateway" "$ingest" "$DATA/ingest.log" listening "$INGEST"
  upload=(--ingest "$INGEST")
  gateway="ingest gateway on $INGEST (sink in $DATA/ingest/, log in $DATA/ingest.log)"
fi

# Agents enrol once with a join token, then connect with their own certificates.
token=$("$BIN/killswitch" enroll-token create --server "$GRPC" --identity "$IDS/ic-1" \
  --uses "$AGENTS" --ttl 600 2>/dev/null)
# Every laptop's notices (paused, resumed, opted out, lease lost) go to one file, a line
# per notice: what the people at the laptops would see on their desktops.
NOTICES="$DATA/notices.jsonl"
"$BIN/killswitch-agent" simulate --server "$GRPC" --agents "$AGENTS" --report-every 15 \
  --enroll-token "$token" --ca "$DATA/pki/ca.pem" --state-dir "$DATA/agents" \
  --notify "file:$NOTICES" ${upload[@]+"${upload[@]}"} &

cat <<EOT

  Control server on $GRPC (state in $DATA/, log in $DATA/server.log), $AGENTS simulated agents,
  $gateway. People's identities (their own keys) are in $IDS/.
  The laptops' notices go to $NOTICES (one JSON line per notice).
  In another terminal:

    export KILLSWITCH_SERVER=$GRPC KILLSWITCH_IDENTITY=$IDS/ic-1   # incident commander
    .venv/bin/killswitch pause --all --reason "data leak" --ticket INC-1 --wait
    .venv/bin/killswitch status
    tail -f $NOTICES                  # what each laptop's owner is told, and by whom
    .venv/bin/killswitch agents --state VERIFIED_STOPPED --selector region=eu-west
    .venv/bin/killswitch holds
    .venv/bin/killswitch report --hold HOLD_ID --out report/   # signed proof: report.json + .html
    .venv/bin/killswitch report verify report/                 # offline, names any altered row
    .venv/bin/killswitch resume --hold HOLD_ID --reason "leak contained"   # asks
    .venv/bin/killswitch approve REQUEST_ID --identity $IDS/approver-1     # a second person
    .venv/bin/killswitch audit verify --identity $IDS/sre-1
    .venv/bin/killswitch me --identity $IDS/employee-1                    # an employee's view
    .venv/bin/killswitch dashboard --identity $IDS/sre-1                  # web dashboard link
    .venv/bin/killswitch certs list --identity $DATA/identities/admin     # the administrator
    curl -s http://$HTTP/metrics | grep '^killswitch_agents'              # Prometheus

  Ctrl-C stops everything.

EOT
wait
