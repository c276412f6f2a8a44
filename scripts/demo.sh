#!/usr/bin/env bash
# End-to-end demo on the local platform emulator (no account needed):
# builds molecule, starts molecule-emulator on 127.0.0.1, creates three workspaces
# (the agent's, a peer's, their parent), connects an `exec` shell agent with
# `molecule connect`, has the peer and a canvas user each send a message, prints the
# replies, then stops everything with SIGTERM.
set -euo pipefail

cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1 || { echo "demo: needs $1 on PATH" >&2; exit 2; }; }
need cargo; need curl; need python3

echo "==> building (release)"
cargo build --release --quiet --bins
BIN="$(scripts/target-dir.sh)/release"

WORK=$(mktemp -d)
EMU_PID=""; AGENT_PID=""
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null || true
  [ -n "$EMU_PID" ] && kill "$EMU_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# JSON field from stdin: json_get key [key ...]
json_get() { python3 -c 'import json,sys
v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[int(k)] if isinstance(v,list) else v[k]
print(v if not isinstance(v,(dict,list)) else json.dumps(v))' "$@"; }

echo "==> starting the platform emulator"
mkfifo "$WORK/banner"
"$BIN/molecule-emulator" --port 0 --quiet >"$WORK/banner" &
EMU_PID=$!
read -r _ _ URL <"$WORK/banner"
echo "    emulator at $URL"
admin() { curl -fsS -X "$1" "$URL$2" -H 'Content-Type: application/json' ${3:+-d "$3"}; }

ROOT=$(admin POST /_admin/workspaces '{"name":"team"}' | json_get id)
AGENT_JSON=$(admin POST /_admin/workspaces "{\"name\":\"shell-agent\",\"parent_id\":\"$ROOT\"}")
PEER_JSON=$(admin POST /_admin/workspaces "{\"name\":\"peer-agent\",\"parent_id\":\"$ROOT\",\"delivery_mode\":\"poll\"}")
AGENT=$(echo "$AGENT_JSON" | json_get id); AGENT_TOKEN=$(echo "$AGENT_JSON" | json_get token)
PEER=$(echo "$PEER_JSON" | json_get id); PEER_TOKEN=$(echo "$PEER_JSON" | json_get token)
echo "    agent workspace $AGENT, peer workspace $PEER"

umask 077
printf '%s' "$AGENT_TOKEN" >"$WORK/agent.token"

echo "==> molecule connect $AGENT --backend exec (a shell agent that answers in upper case)"
"$BIN/molecule" connect "$AGENT" \
  --api-url "$URL" --token-file "$WORK/agent.token" --state-dir "$WORK/state" \
  --backend exec --backend-opt 'cmd=printf "Hi %s, you said: " "${MOLECULE_CALLER_NAME:-$MOLECULE_ORIGIN}"; tr a-z A-Z' \
  --interval-ms 200 2>"$WORK/connect.log" &
AGENT_PID=$!

wait_for() { # wait_for PATH KEY COUNT: poll the admin API until KEY has COUNT entries
  for _ in $(seq 1 150); do
    n=$(admin GET "$1" | python3 -c "import json,sys; print(len(json.load(sys.stdin)['$2']))")
    [ "$n" -ge "$3" ] && return 0
    sleep 0.1
  done
  echo "demo: timed out waiting for $1; connector log:" >&2; cat "$WORK/connect.log" >&2; exit 1
}

# Until the connector has registered, the platform still treats the workspace as push
# mode and could not deliver to it: wait for `molecule status` to report it healthy.
for _ in $(seq 1 150); do
  "$BIN/molecule" status --workspace "$AGENT" --state-dir "$WORK/state" >/dev/null 2>&1 && break
  sleep 0.1
done
"$BIN/molecule" status --workspace "$AGENT" --state-dir "$WORK/state" | sed 's/^/    /' \
  || { echo "demo: the connector did not come up; its log:" >&2; cat "$WORK/connect.log" >&2; exit 1; }

echo "==> the peer agent sends a message through the platform's A2A proxy"
curl -fsS -X POST "$URL/workspaces/$AGENT/a2a" \
  -H "Authorization: Bearer $PEER_TOKEN" -H "X-Workspace-ID: $PEER" -H 'Content-Type: application/json' \
  -d '{"jsonrpc":"2.0","id":"1","method":"message/send","params":{"message":{"role":"user","messageId":"demo-1","parts":[{"kind":"text","text":"can you hear me?"}]}}}' \
  | sed 's/^/    platform answered the peer: /'; echo
wait_for "/_admin/workspaces/$PEER/received" messages 1
echo "    reply delivered to the peer: $(admin GET "/_admin/workspaces/$PEER/received" | json_get messages 0 text)"

echo "==> a user on the canvas sends a message"
admin POST "/_admin/workspaces/$AGENT/enqueue" '{"text":"hello from the canvas"}' >/dev/null
wait_for "/_admin/workspaces/$AGENT/notifies" notifies 1
echo "    reply shown on the canvas: $(admin GET "/_admin/workspaces/$AGENT/notifies" | json_get notifies 0 message)"

echo "==> stopping the connector (SIGTERM)"
kill -TERM "$AGENT_PID"
status=0; wait "$AGENT_PID" || status=$?
AGENT_PID=""
echo "    molecule connect exited with status $status; saved cursor:"
sed 's/^/      /' "$WORK/state/$AGENT.json" | head -4
echo "==> connector log (stderr)"
sed 's/^/    /' "$WORK/connect.log"
[ "$status" -eq 0 ] || { echo "demo: connector exit status $status" >&2; exit 1; }
echo "==> demo finished"
