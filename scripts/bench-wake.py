#!/usr/bin/env python3
"""Issue 12's benchmark phases (stdlib only), run by scripts/bench.sh --phases with any of:

  wake-latency  enqueue -> reply with `exec cat` at the default settings, --wake auto (event
                stream) and --wake poll side by side: p50/p95 (targets: events p50 <= 30 ms,
                p95 <= 100 ms; poll unchanged from before)
  wake-idle     requests per minute of one idle workspace with a healthy stream (target <= 8)
  org-bucket    20 workspaces in one `connect --workspaces` process sharing a 600/min org
                bucket, 2 minutes with a message to each every 4-6 s: 429s (target 0), the
                largest heartbeat gap (target <= period + 5 s), lost/duplicated (target 0)
  burst700      one workspace, 700 messages queued, 600/min token bucket: all answered once,
                total time within 1.2x of what the limit allows, 0 x 429 after the first window

Writes one JSON document to --out and prints a table on stderr.
"""

import argparse
import http.client
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time

ORG = "0f0f0f0f-0000-4000-8000-00000000b12c"


def log(msg):
    print(f"bench-wake: {msg}", file=sys.stderr, flush=True)


def now_ms():
    return int(time.time() * 1000)


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Emulator:
    def __init__(self, binary, args):
        self.proc = subprocess.Popen([binary, "--port", "0", "--quiet", *args],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if "listening on" not in line:
            raise RuntimeError(f"emulator banner {line!r}")
        self.url = line.split()[-1]
        self.conn = http.client.HTTPConnection("127.0.0.1", int(self.url.rsplit(":", 1)[1]), timeout=30)
        self.seen = {}  # stats entries collected across polls: key -> entry

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                if attempt == 2:
                    raise
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:200]!r}")
        return json.loads(raw) if raw else None

    def ws(self, name, parent=None):
        return self.call("POST", "/_admin/workspaces", {"name": name, "parent_id": parent, "delivery_mode": "poll"})

    def received(self, ws):
        return self.call("GET", f"/_admin/workspaces/{ws}/received")["messages"]

    def collect(self):
        """Accumulates the emulator's recent-request log (it keeps the last 1000)."""
        for e in self.call("GET", "/_admin/stats")["requests"]:
            self.seen[(e["at_ms"], e["method"], e["path"], e["query"], e["status"])] = e
        return list(self.seen.values())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Molecule:
    def __init__(self, binary, args, workdir):
        self.log = open(os.path.join(workdir, f"molecule-{time.monotonic_ns()}.log"), "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOLECULE_") and "proxy" not in k.lower()}
        self.proc = subprocess.Popen([binary, *args], stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, env=env, start_new_session=True)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def token_file(workdir, name, token):
    path = os.path.join(workdir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


def wait_for(what, cond, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def single(a, emu_args, wake, backend_args, extra=()):
    """An emulator with a parent, the connector's workspace and a peer; a running connector."""
    emu = Emulator(a.emulator, emu_args)
    root = emu.ws("root")["id"]
    me = emu.ws("agent", root)
    peer = emu.ws("peer", root)["id"]
    work = tempfile.mkdtemp(prefix="wake-", dir=a.workdir)
    tf = token_file(work, "token", me["token"])
    args = ["connect", me["id"], "--api-url", emu.url, "--token-file", tf, "--state-dir",
            os.path.join(work, "state"), "--wake", wake, *backend_args, *extra]
    return emu, me["id"], peer, Molecule(a.molecule, args, work)


def ready(emu, ws, wake):
    if wake == "poll":
        wait_for("first poll", lambda: emu.call("GET", "/_admin/stats")["by_route"].get("GET /workspaces/:id/activity"))
    else:
        wait_for("event stream", lambda: emu.call("GET", f"/_admin/workspaces/{ws}/events")["open"] >= 1)
    time.sleep(0.5)


def phase_latency(a):
    out = {}
    for wake in ("auto", "poll"):
        emu, ws, peer, m = single(a, [], wake, ["--backend", "exec", "--backend-opt", "cmd=cat"])
        try:
            ready(emu, ws, wake)
            lat = []
            rng = random.Random(12)
            for i in range(a.samples):
                text = f"lat-{wake}-{i}"
                t0 = now_ms()
                emu.call("POST", f"/_admin/workspaces/{ws}/enqueue", {"from": peer, "text": text})
                got = wait_for(f"reply {i}", lambda: [r for r in emu.received(peer) if r["text"] == text], 10)
                lat.append(got[0]["at_ms"] - t0)
                time.sleep(rng.uniform(0.2, 1.2))
            out[wake] = {"samples": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
                         "max_ms": max(lat)}
            log(f"latency --wake {wake}: p50 {out[wake]['p50_ms']} ms, p95 {out[wake]['p95_ms']} ms")
        finally:
            m.stop()
            emu.stop()
    return out


def phase_idle(a):
    emu, ws, peer, m = single(a, [], "auto", ["--backend", "mock"])
    try:
        ready(emu, ws, "auto")
        emu.call("POST", f"/_admin/workspaces/{ws}/enqueue", {"from": peer, "text": "warm up"})
        wait_for("warm-up reply", lambda: emu.received(peer))
        time.sleep(5)
        emu.call("POST", "/_admin/reset_stats")
        time.sleep(a.idle_secs)
        stats = emu.call("GET", "/_admin/stats")
        per_min = stats["requests_total"] * 60 / a.idle_secs
        res = {"secs": a.idle_secs, "requests": stats["requests_total"], "requests_per_min": round(per_min, 1),
               "by_route": stats["by_route"]}
        log(f"idle with a healthy stream: {res['requests_per_min']} requests/min ({stats['by_route']})")
        return res
    finally:
        m.stop()
        emu.stop()


def phase_org_bucket(a):
    emu = Emulator(a.emulator, ["--org-id", ORG, "--rate-limit", "600"])
    work = tempfile.mkdtemp(prefix="org-", dir=a.workdir)
    root = emu.ws("root")["id"]
    peer = emu.ws("peer", root)["id"]
    entries, wss = [], []
    for i in range(20):
        w = emu.ws(f"agent{i}", root)
        entries.append({"id": w["id"], "token_file": token_file(work, f"t{i}", w["token"])})
        wss.append(w["id"])
    lst = os.path.join(work, "workspaces.json")
    with open(lst, "w") as f:
        json.dump(entries, f)
    m = Molecule(a.molecule, ["connect", "--workspaces", lst, "--api-url", emu.url, "--org-id", ORG,
                              "--state-dir", os.path.join(work, "state"), "--backend", "mock"], work)
    try:
        wait_for("20 streams", lambda: all(
            emu.call("GET", f"/_admin/workspaces/{w}/events")["open"] >= 1 for w in wss), 60)
        rng = random.Random(7)
        sent = {}
        next_at = {w: time.monotonic() + rng.uniform(0, 5) for w in wss}
        start = time.monotonic()
        start_ms = now_ms()
        last_collect = 0
        while time.monotonic() - start < a.org_secs:
            t = time.monotonic()
            for w in wss:
                if t >= next_at[w]:
                    text = f"{w[:8]}-{len(sent)}"
                    emu.call("POST", f"/_admin/workspaces/{w}/enqueue", {"from": peer, "text": text})
                    sent[text] = w
                    next_at[w] = t + rng.uniform(4, 6)
            if t - last_collect > 3:
                emu.collect()
                last_collect = t
            time.sleep(0.05)
        wait_for("every reply", lambda: len({r["text"] for r in emu.received(peer)}) >= len(sent), 120)
        reqs = emu.collect()
        got = [r["text"] for r in emu.received(peer)]
        answered = {t[len("echo: "):] for t in got}
        beats = {}
        for e in reqs:
            if e["path"] == "/registry/heartbeat" and e["at_ms"] >= start_ms:
                beats.setdefault(e.get("workspace_id") or "?", []).append(e["at_ms"])
        gaps = []
        for w, ts in beats.items():
            ts.sort()
            gaps.extend(b - a_ for a_, b in zip(ts, ts[1:]))
        stats = emu.call("GET", "/_admin/stats")
        res = {
            "workspaces": 20, "secs": a.org_secs, "messages": len(sent),
            "answered": len(answered & set(sent)), "lost": len(set(sent) - answered),
            "duplicated": len(got) - len(set(got)),
            "rate_limited_429": stats["by_status"].get("429", 0),
            "requests_total": stats["requests_total"],
            "max_heartbeat_gap_s": round(max(gaps) / 1000, 1) if gaps else None,
            "heartbeats_seen": sum(len(v) for v in beats.values()),
        }
        log(f"org bucket: {res}")
        return res
    finally:
        m.stop()
        emu.stop()


def phase_burst(a):
    emu = Emulator(a.emulator, ["--rate-limit", "600"])
    work = tempfile.mkdtemp(prefix="burst-", dir=a.workdir)
    root = emu.ws("root")["id"]
    me = emu.ws("agent", root)
    peer = emu.ws("peer", root)["id"]
    msgs = [{"from": peer, "text": f"b{i:04d}"} for i in range(700)]
    for i in range(0, 700, 350):
        emu.call("POST", f"/_admin/workspaces/{me['id']}/enqueue_batch", {"messages": msgs[i:i + 350]})
    tf = token_file(work, "token", me["token"])
    t0 = time.monotonic()
    start_ms = now_ms()
    m = Molecule(a.molecule, ["connect", me["id"], "--api-url", emu.url, "--token-file", tf, "--state-dir",
                              os.path.join(work, "state"), "--backend", "mock", "--since-secs", "3600"], work)
    try:
        last = 0
        while True:
            n = len(emu.received(peer))
            if time.monotonic() - last > 3:
                emu.collect()
                last = time.monotonic()
            if n >= 700 or time.monotonic() - t0 > 400:
                break
            time.sleep(0.1)
        total = time.monotonic() - t0
        reqs = emu.collect()
        got = [r["text"] for r in emu.received(peer)]
        first_window_end = min((e["at_ms"] for e in reqs), default=start_ms) + 60_000
        after = sum(1 for e in reqs if e["status"] == 429 and e["at_ms"] >= first_window_end)
        stats = emu.call("GET", "/_admin/stats")
        # What the limit allows: every request this run needed, at 600 per 60 s window.
        needed = stats["requests_total"] - stats["by_status"].get("429", 0)
        allowed_s = 60 * ((needed - 1) // 600) + ((needed - 1) % 600 + 1) * 60 / 600 if needed else 0
        res = {"messages": 700, "answered_unique": len(set(got)), "duplicated": len(got) - len(set(got)),
               "total_s": round(total, 1), "requests": needed,
               "limit_allows_s": round(allowed_s, 1),
               "ratio_to_limit": round(total / allowed_s, 2) if allowed_s else None,
               "rate_limited_429": stats["by_status"].get("429", 0),
               "rate_limited_429_after_first_window": after}
        log(f"burst 700: {res}")
        return res
    finally:
        m.stop()
        emu.stop()


PHASES = {"wake-latency": phase_latency, "wake-idle": phase_idle, "org-bucket": phase_org_bucket,
          "burst700": phase_burst}


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", required=True)
    p.add_argument("--emulator", required=True)
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--out", default="bench-wake-results.json")
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--idle-secs", type=int, default=60)
    p.add_argument("--org-secs", type=int, default=120)
    a = p.parse_args(argv)
    a.workdir = tempfile.mkdtemp(prefix="bench-wake-")
    res = {}
    for name in [x for x in a.phases.split(",") if x]:
        if name not in PHASES:
            log(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
            return 2
        log(f"phase {name}")
        res[name] = PHASES[name](a)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
