#!/usr/bin/env bash
# Static checks of the deployment recipes in this directory, as far as a machine without
# systemd as PID 1, a container engine or a cluster allows. Each tool is optional: a missing
# one is reported as "skip". Run from anywhere: scripts/deploy/check.sh
#   systemd units  systemd-analyze verify (any warning counts as a failure)
#   run scripts    sh -n, shellcheck
#   YAML/JSON      python3 (yaml module), kubernetes-validate --strict if installed
#   FROM scratch   the static binary runs with an empty environment in an empty directory
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pass=0; fail=0
ok()   { echo "ok   $*"; pass=$((pass + 1)); }
bad()  { echo "FAIL $*"; fail=$((fail + 1)); }
skip() { echo "skip $*"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

if command -v systemd-analyze >/dev/null; then
  # Templates are verified as an instance; ExecStart= must exist for verify to pass.
  cp "$here/molecule-connect.service" "$tmp/"
  cp "$here/molecule-connect@.service" "$tmp/molecule-connect@example.service"
  cp "$here/molecule-connect-health@.service" "$tmp/molecule-connect-health@example.service"
  cp "$here/molecule-connect-health@.timer" "$tmp/molecule-connect-health@example.timer"
  # Not installed: point ExecStart= at a built binary instead (verify needs it to exist).
  built=""
  for b in "$here"/../../target/x86_64-unknown-linux-musl/release/molecule "$here"/../../target/debug/molecule; do
    if [ -x "$b" ]; then built=$(cd "$(dirname "$b")" && pwd)/molecule; break; fi
  done
  if [ ! -x /usr/local/bin/molecule ] && [ -n "$built" ]; then
    sed -i "s#/usr/local/bin/molecule#$built#g" "$tmp"/*.service
  fi
  if [ -x /usr/local/bin/molecule ] || [ -n "$built" ]; then
    for u in "$tmp"/*.service "$tmp"/*.timer; do
      out=$(cd "$tmp" && systemd-analyze verify --man=no "./$(basename "$u")" 2>&1)
      if [ -z "$out" ]; then ok "systemd-analyze verify $(basename "$u")"
      else bad "systemd-analyze verify $(basename "$u"): $out"; fi
    done
  else
    skip "systemd-analyze verify: /usr/local/bin/molecule (ExecStart=) is not installed"
  fi
else
  skip "systemd-analyze: not installed"
fi

scripts=(runit/run runit/finish runit/log/run s6/run s6/finish s6/log/run)
if grep -qx '3' "$here/s6/notification-fd" && grep -q -- '--notification-fd 3' "$here/s6/run"; then
  ok "s6 notification-fd and --notification-fd agree (3)"
else bad "s6/notification-fd and s6/run's --notification-fd differ"; fi
for u in molecule-connect.service molecule-connect@.service; do
  if grep -qx 'Type=notify' "$here/$u" && grep -q '^WatchdogSec=' "$here/$u"; then ok "$u: Type=notify with WatchdogSec="
  else bad "$u: not Type=notify with WatchdogSec="; fi
done
for s in "${scripts[@]}"; do
  if sh -n "$here/$s"; then ok "sh -n $s"; else bad "sh -n $s"; fi
  if [ -x "$here/$s" ]; then ok "executable $s"; else bad "not executable: $s"; fi
done
if command -v shellcheck >/dev/null; then
  if (cd "$here" && shellcheck -s sh "${scripts[@]}" runit/conf.example s6/conf.example); then
    ok "shellcheck (${#scripts[@]} scripts, 2 conf examples)"
  else bad "shellcheck"; fi
else
  skip "shellcheck: not installed"
fi

if python3 -c 'import yaml' 2>/dev/null; then
  if python3 - "$here/kubernetes.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"]: d for d in docs}
assert set(kinds) >= {"Secret", "Deployment"}, kinds.keys()
dep = kinds["Deployment"]["spec"]
pod = dep["template"]["spec"]
assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"
assert pod["terminationGracePeriodSeconds"] > 30
c = pod["containers"][0]
assert c["securityContext"]["readOnlyRootFilesystem"] is True
assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
assert "livenessProbe" in c
assert any("--metrics-file" in a for a in c["args"]), "no --metrics-file"
assert any(x["name"] == "metrics" for x in pod["containers"][1:]), "no metrics sidecar"
PY
  then ok "kubernetes.yaml parses; replicas 1, Recreate, grace > drain, hardened, probed"
  else bad "kubernetes.yaml structure"; fi
else
  skip "YAML: python3 yaml module missing"
fi
if command -v kubernetes-validate >/dev/null; then
  if kubernetes-validate --strict --quiet "$here/kubernetes.yaml"; then ok "kubernetes-validate --strict"
  else bad "kubernetes-validate --strict"; fi
else
  skip "kubernetes-validate: not installed (pip install kubernetes-validate)"
fi
if python3 -m json.tool "$here/workspaces.example.json" >/dev/null; then ok "workspaces.example.json parses"
else bad "workspaces.example.json"; fi

bin="$("$here/../target-dir.sh")/x86_64-unknown-linux-musl/release/molecule"
if [ -x "$bin" ]; then
  mkdir "$tmp/empty" && cp "$bin" "$tmp/empty/molecule"
  if (cd "$tmp/empty" && env -i ./molecule --version >/dev/null); then
    ok "static binary runs with an empty environment in an empty directory (FROM scratch)"
  else bad "static binary under env -i"; fi
else
  skip "FROM scratch smoke test: build the musl binary first"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
