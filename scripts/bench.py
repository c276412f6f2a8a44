#!/usr/bin/env python3
"""Benchmark driver for `molecule connect` against the local platform emulator.

Run through scripts/bench.sh (which builds the release binaries first); see its header
for what is measured. Standard library only. Everything talks to 127.0.0.1 only, every
loop is bounded in count and time, and phases run one after another (never in parallel).

Output: one JSON document (--out FILE and stdout), a short table on stderr, exit 0 when
every target of issue 6 passes, 1 otherwise, 2 on a usage or set-up error.
"""

import argparse
import http.client
import json
import os
import platform
import random
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where cargo puts the binaries (CARGO_TARGET_DIR and cargo configs move it).
TARGET = subprocess.run([os.path.join(ROOT, "scripts", "target-dir.sh")], capture_output=True,
                        text=True).stdout.strip() or os.path.join(ROOT, "target")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIZE_BUDGET = 2_500_000  # bytes; the same budget as scripts/check.sh

# The Python agent of the worker phase (issue 14): a few standard-library imports, echo the
# text. The same file runs as an exec command (one process per message) and, with
# --worker, as a worker (one process, NDJSON on stdin/stdout).
PY_AGENT = """\
import collections, datetime, hashlib, json, re, sys, textwrap

def reply(text):
    return text

if "--worker" in sys.argv:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps({"id": req["id"], "text": reply(req["text"])}), flush=True)
else:
    sys.stdout.write(reply(sys.stdin.read()))
"""

# The raw spawn rate of `cat` (issue 14 item 7): posix_spawn with a pipe each way, the
# message written, the echo read, the child reaped; like the exec backend does per message.
SPAWN_C = r"""
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    const char *msg = "spawn-1 backlog message 1 of 2000";
    char *args[] = {"cat", NULL};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++) {
        int in[2], out[2];
        if (pipe(in) || pipe(out)) return 1;
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, in[0], 0);
        posix_spawn_file_actions_adddup2(&fa, out[1], 1);
        posix_spawn_file_actions_addclose(&fa, in[0]);
        posix_spawn_file_actions_addclose(&fa, in[1]);
        posix_spawn_file_actions_addclose(&fa, out[0]);
        posix_spawn_file_actions_addclose(&fa, out[1]);
        pid_t pid;
        if (posix_spawn(&pid, argv[2], &fa, NULL, args, environ)) return 1;
        posix_spawn_file_actions_destroy(&fa);
        close(in[0]);
        close(out[1]);
        if (write(in[1], msg, strlen(msg)) < 0) return 1;
        close(in[1]);
        char buf[4096];
        while (read(out[0], buf, sizeof buf) > 0) {}
        close(out[0]);
        int st;
        waitpid(pid, &st, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%f\n", n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
    return 0;
}
"""

# --backend arguments per backend name of the phases ({agent}: the Python agent's path).
BACKEND_ARGS = {
    "mock": ["--backend", "mock"],
    "exec": ["--backend", "exec", "--backend-opt", "cmd=cat"],
    "exec_py": ["--backend", "exec", "--backend-opt", "cmd=python3 {agent}"],
    "worker_py": ["--backend", "worker", "--backend-opt", "cmd=python3 {agent} --worker",
                  "--backend-opt", "ready=true"],
    # `cat` is a worker already: it answers every request line with itself, whose
    # "id" and "text" make it a valid answer echoing the text.
    "worker_cat": ["--backend", "worker", "--backend-opt", "cmd=cat"],
}


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def now_ms():
    return time.time() * 1000.0


def summary(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(vals), 3),
        "min": round(min(vals), 3),
        "max": round(max(vals), 3),
        "n": len(vals),
    }


def percentile(values, p):
    """Percentile with linear interpolation between closest ranks (p in 0..100)."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return round(vals[lo] + (vals[hi] - vals[lo]) * (pos - lo), 3)


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def host_cpu_ticks():
    """(busy, total) ticks over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])
    return total - idle, total


def own_cpu_s(pids):
    """CPU seconds of this driver plus the given processes (self + waited children)."""
    t = os.times()
    total = t.user + t.system
    for pid in pids:
        st = proc_stat(pid)
        if st:
            total += st["cpu_s"] + st["children_cpu_s"]
    return total


class Noise:
    """CPU used on the host by anything but us during a measurement: other people's
    builds and tests on a shared 2-core machine invalidate a benchmark."""

    def __init__(self, pids):
        self.pids = list(pids)
        self.busy0, _ = host_cpu_ticks()
        self.own0 = own_cpu_s(self.pids)
        self.t0 = time.monotonic()

    def add(self, pid):
        st = proc_stat(pid)
        self.pids.append(pid)
        if st:  # a new process starts at ~0 anyway
            self.own0 += st["cpu_s"] + st["children_cpu_s"]

    def result(self):
        busy1, _ = host_cpu_ticks()
        own1 = own_cpu_s(self.pids)
        dt = time.monotonic() - self.t0
        others = max(0.0, (busy1 - self.busy0) / CLK_TCK - (own1 - self.own0))
        return {"others_cpu_s": round(others, 3),
                "others_pct_of_core": round(100 * others / dt, 1) if dt > 0 else None,
                "loadavg": loadavg()}


def wait_quiet(max_wait_s, threshold_pct, pids):
    """Wait (bounded) until the machine is quiet: others below threshold_pct of one core
    over a 1 s sample. Returns (seconds waited, last sample %)."""
    start = time.monotonic()
    pct = None
    announced = False
    while True:
        n = Noise(pids)
        time.sleep(1.0)
        pct = n.result()["others_pct_of_core"]
        if pct is not None and pct <= threshold_pct:
            break
        waited = time.monotonic() - start
        if waited >= max_wait_s:
            log(f"machine still busy after {waited:.0f} s (others use {pct} % of a core); measuring anyway")
            break
        if not announced:
            log(f"waiting for a quiet machine (others use {pct} % of a core; up to {max_wait_s:.0f} s)")
            announced = True
    return round(time.monotonic() - start, 1), pct


# ------------------------------------------------------------------ /proc readings


def proc_stat(pid):
    """CPU seconds (self, waited-for children) and thread count from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return {
        "cpu_s": (utime + stime) / CLK_TCK,
        "children_cpu_s": (cutime + cstime) / CLK_TCK,
        "threads": int(rest[17]),
    }


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmSize", "RssAnon", "RssFile", "RssShmem"):
                    out[key + "_kB"] = int(val.split()[0])
                elif key == "Threads":
                    out["Threads"] = int(val)
    except OSError:
        return None
    return out


def smaps_rollup(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    out[parts[0].rstrip(":") + "_kB"] = int(parts[1])
    except OSError:
        return None
    return out


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# ------------------------------------------------------------------ HTTP


class Http:
    """A keep-alive JSON client for 127.0.0.1 (reconnects once on a broken connection)."""

    def __init__(self, port, timeout=30):
        self.port = port
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=hdrs)
                resp = self.conn.getresponse()
                raw = resp.read()
                status = resp.status
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return status, payload

    def ok(self, method, path, body=None):
        status, payload = self.request(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {payload}")
        return payload

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Emulator:
    def __init__(self, binary, workdir):
        self.log_path = os.path.join(workdir, "emulator.log")
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--quiet"],
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if "listening on http://127.0.0.1:" not in line:
            self.stop()
            raise RuntimeError(f"emulator did not start (banner {line!r}); see {self.log_path}")
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.admin = Http(self.port)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()

    # admin helpers
    def create_ws(self, name, parent=None):
        return self.admin.ok(
            "POST", "/_admin/workspaces", {"name": name, "parent_id": parent, "delivery_mode": "poll"}
        )

    def enqueue(self, ws, sender, text):
        return self.admin.ok("POST", f"/_admin/workspaces/{ws}/enqueue", {"from": sender, "text": text})

    def enqueue_batch(self, ws, messages):
        out = []
        for i in range(0, len(messages), 500):
            res = self.admin.ok(
                "POST", f"/_admin/workspaces/{ws}/enqueue_batch", {"messages": messages[i : i + 500]}
            )["results"]
            for r in res:
                if "error" in r:
                    raise RuntimeError(f"enqueue_batch: {r['error']}")
            out.extend(res)
        return out

    def info(self, ws):
        return self.admin.ok("GET", f"/_admin/workspaces/{ws}")

    def received(self, ws):
        return self.admin.ok("GET", f"/_admin/workspaces/{ws}/received")["messages"]

    def notifies(self, ws):
        return self.admin.ok("GET", f"/_admin/workspaces/{ws}/notifies")["notifies"]

    def stats(self):
        return self.admin.ok("GET", "/_admin/stats")

    def reset_stats(self):
        self.admin.ok("POST", "/_admin/reset_stats")


# ------------------------------------------------------------------ connectors


class Fixture:
    """A parent, the connector's workspace and its sibling peers, plus token and state dir."""

    def __init__(self, emu, workdir, tag, peers):
        self.emu = emu
        self.tag = tag
        parent = emu.create_ws(f"bench-{tag}-team")["id"]
        me = emu.create_ws(f"bench-{tag}-agent", parent)
        self.ws, self.token = me["id"], me["token"]
        self.peers = [emu.create_ws(f"bench-{tag}-peer{i}", parent)["id"] for i in range(peers)]
        self.dir = tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir)
        self.state_dir = os.path.join(self.dir, "state")
        os.makedirs(self.state_dir, mode=0o700)
        self.token_file = os.path.join(self.dir, "token")
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

    def write_cursor(self, activity_id):
        """Go-CLI compatible state file: start right after `activity_id`."""
        path = os.path.join(self.state_dir, f"{self.ws}.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"workspace_id": self.ws, "last_since_id": activity_id}, f)


class Connector:
    """How to start one connector. `kind` is 'molecule' or 'vs'."""

    def __init__(self, name, kind, binary=None, template=None):
        self.name, self.kind, self.binary, self.template = name, kind, binary, template
        self.agent = None  # the Python agent's path, set by Bench

    def has(self, placeholder):
        return self.kind == "molecule" or "{" + placeholder + "}" in self.template

    def command(self, fx, url, backend, concurrency, interval_ms):
        if self.kind == "molecule":
            cmd = [
                self.binary, "connect", fx.ws, "--api-url", url, "--token-file", fx.token_file,
                "--state-dir", fx.state_dir, "--backend", backend, "--interval-ms", str(interval_ms),
                "--concurrency", str(concurrency),
            ]
            i = cmd.index("--backend")
            cmd[i:i + 2] = [a.replace("{agent}", self.agent or "") for a in BACKEND_ARGS[backend]]
            return cmd
        backend_args = "--backend mock" if backend == "mock" else "--backend exec --backend-opt cmd=cat"
        values = {
            "url": url, "workspace": fx.ws, "token": fx.token, "token_file": fx.token_file,
            "state_dir": fx.state_dir, "backend_args": backend_args,
            "concurrency": str(concurrency), "interval_ms": str(interval_ms),
        }
        text = self.template
        for key, val in values.items():
            quoted = shlex.quote(val) if key != "backend_args" else val
            text = text.replace("{" + key + "}", quoted)
        return ["/bin/sh", "-c", "exec " + text]


class Running:
    """A started connector process."""

    def __init__(self, cmd, log_path, capture_lines=False):
        self.log_path = log_path
        self.lines = []  # (epoch ms, line) when capture_lines
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOLECULE_")}
        self.log_file = open(log_path, "wb")
        self.t0_ms = now_ms()
        self.t0_mono = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.PIPE if capture_lines else self.log_file,
            env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.reader = None
        if capture_lines:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def _read(self):
        for raw in self.proc.stderr:
            t = now_ms()
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((t, line))
            self.log_file.write(raw)
        self.log_file.flush()

    def alive(self):
        return self.proc.poll() is None

    def wait_exit(self, timeout_s):
        """Seconds until the process is gone (precise with a pidfd), None on timeout."""
        start = time.monotonic()
        if self.pidfd is not None:
            p = select.poll()
            p.register(self.pidfd, select.POLLIN)
            if not p.poll(timeout_s * 1000):
                return None
            elapsed = time.monotonic() - start
            self.proc.wait(1)
            return elapsed
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return time.monotonic() - start
            time.sleep(0.001)
        return None

    def stop(self, timeout_s=10):
        """SIGTERM, then the time to exit (s) and the exit code; SIGKILL after timeout_s."""
        if self.proc.poll() is not None:
            return 0.0, self.proc.returncode
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        elapsed = self.wait_exit(timeout_s)
        if elapsed is None:
            self.kill()
        elif self.pidfd is None:
            elapsed = time.monotonic() - t
        self.close()
        return elapsed, self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            self.proc.wait(5)

    def close(self):
        if self.reader is not None:
            self.reader.join(2)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if not self.log_file.closed:
            self.log_file.close()

    def log_tail(self, n=5):
        try:
            with open(self.log_path, errors="replace") as f:
                return [line.rstrip("\n") for line in f.readlines()[-n:]]
        except OSError:
            return []


# ------------------------------------------------------------------ correctness


def expected_reply(text, backend, strict):
    if not strict:
        return None
    return "echo: " + text if backend == "mock" else text


def check_replies(emu, fx, sent, backend, strict):
    """sent: list of dicts {sender, text, message_id}. Returns per-message first reply time
    and the correctness counters."""
    by_mid = {m["message_id"]: m for m in sent if m["sender"] is not None}
    first_at = {}
    distinct = {}
    wrong = unexpected = resent = 0
    for peer in fx.peers:
        for r in emu.received(peer):
            if r.get("from") != fx.ws:
                continue
            meta = r.get("metadata") or {}
            irt = meta.get("in_reply_to") if isinstance(meta, dict) else None
            m = by_mid.get(irt)
            if m is None or m["sender"] != peer:
                unexpected += 1
                continue
            if r.get("duplicate"):
                resent += 1  # same reply messageId again: deduplicated by the platform
            distinct.setdefault(irt, set()).add(r.get("message_id"))
            if irt not in first_at or r["at_ms"] < first_at[irt]:
                first_at[irt] = r["at_ms"]
                exp = expected_reply(m["text"], backend, strict)
                m["_reply_ok"] = exp is None or r.get("text") == exp
    # Canvas replies: notifies on our own workspace, attributed by the unique tag in the text.
    canvas = {m["tag"]: m for m in sent if m["sender"] is None}
    unattributed = 0
    canvas_counts = {}
    for n in emu.notifies(fx.ws):
        text = n.get("message") or ""
        tag = _tag_of(text[len("echo: "):] if text.startswith("echo: ") else text)
        if tag not in canvas:
            tag = None
        if tag is None:
            if strict:
                unexpected += 1
            else:
                unattributed += 1
            continue
        m = canvas[tag]
        canvas_counts[tag] = canvas_counts.get(tag, 0) + 1
        if tag not in first_at or n["at_ms"] < first_at[tag]:
            first_at[tag] = n["at_ms"]
            exp = expected_reply(m["text"], backend, strict)
            m["_reply_ok"] = exp is None or text == exp
    dup = sum(len(ids) - 1 for ids in distinct.values() if len(ids) > 1)
    dup += sum(c - 1 for c in canvas_counts.values() if c > 1)
    lost = 0
    times = []
    for m in sent:
        key = m["message_id"] if m["sender"] is not None else m["tag"]
        if key in first_at:
            times.append(first_at[key])
            if not m.get("_reply_ok", True):
                wrong += 1
        else:
            lost += 1
    if unattributed:  # non-strict canvas replies without our tag: count them against losses
        covered = min(unattributed, lost)
        lost -= covered
        dup += unattributed - covered
    return {
        "lost": lost,
        "duplicated": dup,
        "wrong_text": wrong + unexpected,
        "resent_same_id": resent,
        "last_reply_at_ms": max(times) if times else None,
        "first_at": first_at,
    }


def _tag_of(text):
    """Our messages look like '<tag> payload'; the tag is the first word."""
    return text.split(" ", 1)[0] if text else ""


def reply_count(emu, fx):
    return sum(emu.info(p)["received"] for p in fx.peers) + emu.info(fx.ws)["notifies"]


def wait_first_poll(emu, ws, timeout_s=10):
    """Epoch ms of the first GET activity of `ws` in the emulator's request log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in emu.stats()["requests"]:
            if r["method"] == "GET" and r.get("workspace_id") == ws and r["path"].endswith("/activity"):
                return r["at_ms"]
        time.sleep(0.005)
    return None


def api_requests(stats):
    return {k: v for k, v in stats["by_route"].items()}


# ------------------------------------------------------------------ phases


class Bench:
    def __init__(self, args, emu, workdir):
        self.args, self.emu, self.workdir = args, emu, workdir
        self.agent = os.path.join(workdir, "py_agent.py")
        with open(self.agent, "w") as f:
            f.write(PY_AGENT)
        self.rng = random.Random(args.seed)
        self.counter = 0
        self.quiet_budget = args.quiet_budget
        self.quiet = {}

    def tag(self, what):
        self.counter += 1
        return f"{what}{self.counter}"

    def fixture(self, what):
        return Fixture(self.emu, self.workdir, self.tag(what), self.args.peers)

    def settle(self):
        """Before a run: wait (bounded per run and in total) for the machine to be quiet."""
        budget = min(self.args.quiet_wait, self.quiet_budget)
        waited, pct = wait_quiet(budget, self.args.quiet_pct, [self.emu.proc.pid]) if budget > 0 else (0, None)
        self.quiet_budget = max(0.0, self.quiet_budget - waited)
        self.quiet = {"waited_s": waited, "others_pct_before": pct}

    def start(self, conn, fx, backend="mock", concurrency=1, capture=False, interval_ms=None):
        """Start the connector; self.noise measures what else used the CPU meanwhile."""
        conn.agent = self.agent
        cmd = conn.command(fx, self.emu.url, backend, concurrency, interval_ms or self.args.interval_ms)
        self.noise = Noise([self.emu.proc.pid])
        run = Running(cmd, os.path.join(fx.dir, "connector.log"), capture_lines=capture)
        self.noise.add(run.pid)
        return run

    def contention(self):
        out = dict(self.quiet)
        out.update(self.noise.result())
        if out["others_pct_of_core"] is not None and out["others_pct_of_core"] > 2 * self.args.quiet_pct:
            log(f"warning: other processes used {out['others_pct_of_core']} % of a core during this run")
        return out

    # -------------------------------------------------------------- backlog
    def backlog_once(self, conn, backend, concurrency, messages=None):
        a, emu = self.args, self.emu
        n_messages = messages or a.messages
        self.settle()
        fx = self.fixture("backlog")
        anchor = emu.enqueue(fx.ws, None, f"{fx.tag}-anchor anchor (before the backlog)")
        fx.write_cursor(anchor["activity_id"])
        senders = fx.peers + [None]
        sent = []
        for i in range(n_messages):
            sender = senders[i % len(senders)]
            tag = f"{fx.tag}-{i}"
            sent.append({"sender": sender, "tag": tag, "text": f"{tag} backlog message {i} of {n_messages}"})
        res = emu.enqueue_batch(fx.ws, [{"from": m["sender"], "text": m["text"]} for m in sent])
        for m, r in zip(sent, res):
            m["message_id"] = r["message_id"]
        emu.reset_stats()
        run = self.start(conn, fx, backend, concurrency)
        # Wait for every reply: bounded by a stall timeout and a hard cap.
        stall_s = 15 + 3 * a.interval_ms / 1000
        hard_deadline = time.monotonic() + 30 + n_messages / 10
        last_n, last_change = -1, time.monotonic()
        complete = False
        peak = {"VmHWM_kB": None, "Threads": None}
        cpu = None
        while time.monotonic() < hard_deadline and run.alive():
            n = reply_count(emu, fx)
            st = proc_status(run.pid)
            if st:
                peak["VmHWM_kB"] = st.get("VmHWM_kB")
                peak["Threads"] = max(peak["Threads"] or 0, st.get("Threads", 0))
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            if n >= n_messages:
                chk = check_replies(emu, fx, sent, backend, conn.kind == "molecule")
                if chk["lost"] == 0:
                    complete = True
                    break
            if time.monotonic() - last_change > stall_s:
                break
            time.sleep(0.05)
        cpu = proc_stat(run.pid)
        noise = self.contention()
        # Settle: duplicates that arrive late still count.
        time.sleep(min(2.0, 0.5 + a.interval_ms / 1000))
        stats = emu.stats()
        stop_s, rc = run.stop()
        chk = check_replies(emu, fx, sent, backend, conn.kind == "molecule")
        elapsed = (chk["last_reply_at_ms"] - run.t0_ms) / 1000 if chk["last_reply_at_ms"] else None
        ok = complete and chk["lost"] == 0 and chk["duplicated"] == 0 and chk["wrong_text"] == 0 and rc == 0
        result = {
            "messages": n_messages,
            "elapsed_s": round(elapsed, 4) if elapsed else None,
            "msgs_per_s": round(n_messages / elapsed, 1) if elapsed and chk["lost"] == 0 else None,
            "lost": chk["lost"], "duplicated": chk["duplicated"], "wrong_text": chk["wrong_text"],
            "resent_same_id": chk["resent_same_id"], "exit_code": rc,
            "connector_cpu_s": cpu and round(cpu["cpu_s"], 3),
            "backend_children_cpu_s": cpu and round(cpu["children_cpu_s"], 3),
            "VmHWM_kB": peak["VmHWM_kB"], "max_threads": peak["Threads"],
            "requests_by_route": api_requests(stats),
            "request_log": request_log_breakdown(stats, fx.ws),
            "contention": noise,
            "correct": ok,
        }
        if not ok:
            result["log_tail"] = run.log_tail()
        return result

    def backlog(self, conn):
        out = {}
        combos = []
        backends = ["mock", "exec"] if conn.has("backend_args") else ["as-is"]
        concs = [1, 4] if conn.has("concurrency") else [1]
        for b in backends:
            for c in concs:
                combos.append((b, c))
        for b, c in combos:
            key = f"{b}_{'seq' if c == 1 else f'c{c}'}"
            runs = []
            for k in range(self.args.repeat):
                r = self.backlog_once(conn, b if b != "as-is" else "exec", c)
                log(f"{conn.name} backlog {key} #{k + 1}: {r['msgs_per_s']} msg/s, "
                    f"lost {r['lost']} dup {r['duplicated']} wrong {r['wrong_text']}")
                runs.append(r)
            out[key] = {
                "backend": b, "concurrency": c,
                "msgs_per_s": summary(r["msgs_per_s"] for r in runs),
                "elapsed_s": summary(r["elapsed_s"] for r in runs),
                "connector_cpu_s": summary(r["connector_cpu_s"] for r in runs),
                "lost": sum(r["lost"] for r in runs),
                "duplicated": sum(r["duplicated"] for r in runs),
                "wrong_text": sum(r["wrong_text"] for r in runs),
                "pass_correctness": all(r["correct"] for r in runs),
                "runs": runs,
            }
        return out

    def backlog_runs(self, conn, backend, messages=None):
        """--repeat sequential backlog runs of `backend`, summarised."""
        runs = []
        for k in range(self.args.repeat):
            r = self.backlog_once(conn, backend, 1, messages)
            log(f"{conn.name} backlog {backend} #{k + 1}: {r['msgs_per_s']} msg/s, "
                f"lost {r['lost']} dup {r['duplicated']} wrong {r['wrong_text']}")
            runs.append(r)
        return {
            "backend": backend, "messages": messages or self.args.messages,
            "msgs_per_s": summary(r["msgs_per_s"] for r in runs),
            "connector_cpu_s": summary(r["connector_cpu_s"] for r in runs),
            "max_threads": summary(r["max_threads"] for r in runs),
            "lost": sum(r["lost"] for r in runs),
            "duplicated": sum(r["duplicated"] for r in runs),
            "wrong_text": sum(r["wrong_text"] for r in runs),
            "pass_correctness": all(r["correct"] for r in runs),
            "runs": runs,
        }

    # -------------------------------------------------------------- spawn (issue 14)
    def raw_spawn_rate(self, n):
        """Spawns of `cat` per second without molecule: C posix_spawn when a C compiler is
        there, else Python's os.posix_spawn (slower: the figure is then a lower bound)."""
        cat = shutil.which("cat")
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc:
            src, exe = os.path.join(self.workdir, "spawn.c"), os.path.join(self.workdir, "spawn")
            if not os.path.exists(exe):
                with open(src, "w") as f:
                    f.write(SPAWN_C)
                subprocess.run([cc, "-O2", "-o", exe, src], check=True)
            out = subprocess.run([exe, str(n), cat], capture_output=True, text=True, check=True)
            return {"how": "C posix_spawn", "spawns_per_s": round(float(out.stdout), 1)}
        msg = b"spawn-1 backlog message 1 of 2000"
        t0 = time.monotonic()
        for _ in range(n):
            r_in, w_in = os.pipe()
            r_out, w_out = os.pipe()
            pid = os.posix_spawn(cat, ["cat"], os.environ, file_actions=[
                (os.POSIX_SPAWN_DUP2, r_in, 0), (os.POSIX_SPAWN_DUP2, w_out, 1),
                (os.POSIX_SPAWN_CLOSE, r_in), (os.POSIX_SPAWN_CLOSE, w_in),
                (os.POSIX_SPAWN_CLOSE, r_out), (os.POSIX_SPAWN_CLOSE, w_out)])
            os.close(r_in)
            os.close(w_out)
            os.write(w_in, msg)
            os.close(w_in)
            while os.read(r_out, 4096):
                pass
            os.close(r_out)
            os.waitpid(pid, 0)
        return {"how": "Python os.posix_spawn", "spawns_per_s": round(n / (time.monotonic() - t0), 1)}

    def spawn(self, conn):
        """exec cat against the raw spawn rate of cat, measured right before and after."""
        n = self.args.messages
        before = self.raw_spawn_rate(n)
        exec_cat = self.backlog_runs(conn, "exec")
        after = self.raw_spawn_rate(n)
        raw = statistics.median([before["spawns_per_s"], after["spawns_per_s"]])
        med = exec_cat["msgs_per_s"]["median"]
        log(f"raw spawn of cat ({before['how']}): {before['spawns_per_s']}/s before, "
            f"{after['spawns_per_s']}/s after; exec cat {med} msg/s")
        return {
            "raw_spawn_before": before, "raw_spawn_after": after, "raw_spawns_per_s": raw,
            "exec_cat": exec_cat,
            "fraction_of_raw_spawn": round(med / raw, 3) if med and raw else None,
            "connector_cpu_ms_per_msg": round(1000 * exec_cat["connector_cpu_s"]["median"] / n, 3)
            if exec_cat["connector_cpu_s"]["median"] else None,
        }

    # -------------------------------------------------------------- worker (issue 14)
    def worker(self, conn):
        """The Python agent as exec and as worker; cat as a worker against mock (the
        handling overhead) and against the emulator's ceiling."""
        exec_n = min(self.args.messages, self.args.exec_py_messages)
        out = {
            "exec_py": self.backlog_runs(conn, "exec_py", exec_n),
            "worker_py": self.backlog_runs(conn, "worker_py"),
            "worker_cat": self.backlog_runs(conn, "worker_cat"),
            "mock": self.backlog_runs(conn, "mock"),
        }
        med = {k: v["msgs_per_s"]["median"] for k, v in out.items()}
        out["worker_vs_exec_python"] = round(med["worker_py"] / med["exec_py"], 1) \
            if med["worker_py"] and med["exec_py"] else None
        # What a worker round trip adds to a message: its time per message over mock's.
        out["handling_overhead_ms"] = round(1000 / med["worker_cat"] - 1000 / med["mock"], 3) \
            if med["worker_cat"] and med["mock"] else None
        for k in ("exec_py", "worker_py", "worker_cat", "mock"):
            cpu = out[k]["connector_cpu_s"]["median"]
            out[k]["connector_cpu_ms_per_msg"] = round(1000 * cpu / out[k]["messages"], 3) if cpu else None
        # The same in the connector's CPU time, which other load on the machine disturbs less.
        cat_cpu, mock_cpu = out["worker_cat"]["connector_cpu_ms_per_msg"], out["mock"]["connector_cpu_ms_per_msg"]
        out["handling_overhead_cpu_ms"] = round(cat_cpu - mock_cpu, 3) if cat_cpu and mock_cpu else None
        return out

    # -------------------------------------------------------------- latency
    def latency_once(self, conn):
        a, emu = self.args, self.emu
        self.settle()
        fx = self.fixture("latency")
        emu.reset_stats()
        run = self.start(conn, fx, "mock" if conn.has("backend_args") else "exec", 1)
        samples, lost, dup, wrong = [], 0, 0, 0
        try:
            if wait_first_poll(emu, fx.ws) is None:
                raise RuntimeError(f"{conn.name}: no poll within 10 s; log: {run.log_tail()}")
            time.sleep(self.rng.uniform(0.2, 0.2 + a.interval_ms / 1000))
            senders = fx.peers + [None]
            strict = conn.kind == "molecule"
            # Random spacing so samples do not align with the poll phase. A reply goes out
            # right after the poll that fetched it, so the next sample is enqueued at a chosen
            # offset after the previous reply's emulator timestamp: one random offset per 1/S
            # slice of the interval, shuffled (stratified sampling). The offsets then cover the
            # poll cycle evenly and p50/p95 are not dominated by sampling noise (plain uniform
            # pauses give p50 a ~70 ms standard error at S=50).
            n = a.latency_samples
            pauses = [(k + self.rng.random()) * a.interval_ms / 1000 / n for k in range(n)]
            self.rng.shuffle(pauses)
            for i in range(a.latency_samples):
                if not run.alive():
                    lost += a.latency_samples - i
                    break
                sender = senders[i % len(senders)]
                tag = f"{fx.tag}-{i}"
                text = f"{tag} latency sample {i}"
                target = fx.ws if sender is None else sender
                field = "notifies" if sender is None else "received"
                before = emu.info(target)[field]
                t1 = now_ms()
                r = emu.enqueue(fx.ws, sender, text)
                t2 = now_ms()
                enq = (t1 + t2) / 2
                deadline = time.monotonic() + 5 + 3 * a.interval_ms / 1000
                got = None
                while time.monotonic() < deadline:
                    if emu.info(target)[field] > before:
                        got = True
                        break
                    time.sleep(0.01)
                if not got:
                    lost += 1
                    samples.append({"i": i, "lost": True})
                    continue
                if sender is None:
                    items = [n for n in emu.notifies(fx.ws)[before:] if not strict or _tag_of(n["message"]) == tag
                             or n["message"].startswith("echo: " + tag + " ")]
                    replies = [(n["at_ms"], n["message"]) for n in items]
                else:
                    items = [m for m in emu.received(sender)[before:]
                             if (m.get("metadata") or {}).get("in_reply_to") == r["message_id"]]
                    replies = [(m["at_ms"], m["text"]) for m in items]
                if not replies:
                    wrong += 1  # a reply arrived, but not to this message
                    samples.append({"i": i, "lost": True})
                    continue
                at, txt = min(replies)
                if strict and txt != "echo: " + text:
                    wrong += 1
                samples.append({"i": i, "enqueued_ms": enq, "reply_at_ms": at,
                                "latency_ms": round(at - enq, 2), "canvas": sender is None})
                target = at + pauses[i] * 1000
                for _ in range(100):  # detection took longer than the offset: next cycle
                    if target >= now_ms() + 1:
                        break
                    target += a.interval_ms
                time.sleep(max(0.0, target - now_ms()) / 1000)
            time.sleep(0.3)
            stats = emu.stats()
            noise = self.contention()
        finally:
            stop_s, rc = run.stop()
        # dup check over everything this connector sent
        for p in fx.peers:
            per = {}
            for m in emu.received(p):
                irt = (m.get("metadata") or {}).get("in_reply_to")
                per.setdefault(irt, set()).add(m.get("message_id"))
            dup += sum(len(s) - 1 for s in per.values())
        counts = {}
        for n in emu.notifies(fx.ws):
            counts[n["message"]] = counts.get(n["message"], 0) + 1
        dup += sum(c - 1 for c in counts.values())
        # Split each latency into poll-phase wait and handling with the emulator's request log.
        polls = sorted(r["at_ms"] for r in stats["requests"]
                       if r["method"] == "GET" and r.get("workspace_id") == fx.ws and r["path"].endswith("/activity"))
        waits, handling = [], []
        for s in samples:
            if s.get("lost"):
                continue
            fetching = [p for p in polls if p <= s["reply_at_ms"] and p >= s["enqueued_ms"] - 1]
            if fetching:
                s["poll_wait_ms"] = round(fetching[0] - s["enqueued_ms"], 2)
                s["handling_ms"] = round(s["reply_at_ms"] - fetching[0], 2)
                waits.append(s["poll_wait_ms"])
                handling.append(s["handling_ms"])
        lat = [s["latency_ms"] for s in samples if not s.get("lost")]
        gaps = [b - a2 for a2, b in zip(polls, polls[1:])]
        ok = lost == 0 and dup == 0 and wrong == 0 and rc == 0
        return {
            "samples": len(lat), "lost": lost, "duplicated": dup, "wrong_text": wrong, "exit_code": rc,
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95),
            "mean_ms": round(statistics.mean(lat), 2) if lat else None,
            "max_ms": max(lat) if lat else None,
            "poll_wait_p50_ms": percentile(waits, 50), "handling_p50_ms": percentile(handling, 50),
            "handling_p95_ms": percentile(handling, 95), "handling_max_ms": max(handling) if handling else None,
            "poll_gap_p50_ms": percentile(gaps, 50), "poll_gap_max_ms": max(gaps) if gaps else None,
            "contention": noise,
            "correct": ok,
            "latencies_ms": lat,
        }

    def latency(self, conn):
        runs = []
        for k in range(self.args.repeat):
            r = self.latency_once(conn)
            log(f"{conn.name} latency #{k + 1}: p50 {r['p50_ms']} ms p95 {r['p95_ms']} ms "
                f"(handling p50 {r['handling_p50_ms']} ms), lost {r['lost']} dup {r['duplicated']}")
            runs.append(r)
        pooled = [x for r in runs for x in r["latencies_ms"]]
        return {
            "interval_ms": self.args.interval_ms,
            "p50_ms": summary(r["p50_ms"] for r in runs),
            "p95_ms": summary(r["p95_ms"] for r in runs),
            "handling_p50_ms": summary(r["handling_p50_ms"] for r in runs),
            "pooled": {"samples": len(pooled), "p50_ms": percentile(pooled, 50), "p95_ms": percentile(pooled, 95)},
            "lost": sum(r["lost"] for r in runs), "duplicated": sum(r["duplicated"] for r in runs),
            "wrong_text": sum(r["wrong_text"] for r in runs),
            "pass_correctness": all(r["correct"] for r in runs),
            "runs": runs,
        }

    # -------------------------------------------------------------- idle
    def idle_once(self, conn):
        a, emu = self.args, self.emu
        self.settle()
        fx = self.fixture("idle")
        emu.reset_stats()
        run = self.start(conn, fx, "mock" if conn.has("backend_args") else "exec", 1)
        try:
            if wait_first_poll(emu, fx.ws) is None:
                raise RuntimeError(f"{conn.name}: no poll within 10 s; log: {run.log_tail()}")
            time.sleep(2.0)  # past start-up
            emu.reset_stats()
            c0, t0 = proc_stat(run.pid), time.monotonic()
            rss, threads = [], []
            end = t0 + a.idle_secs
            while time.monotonic() < end and run.alive():
                st = proc_status(run.pid)
                if st:
                    rss.append(st["VmRSS_kB"])
                    threads.append(st["Threads"])
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            c1, t1 = proc_stat(run.pid), time.monotonic()
            st = proc_status(run.pid) or {}
            smaps = smaps_rollup(run.pid)
            fds = fd_count(run.pid)
            stats = emu.stats()
            noise = self.contention()
        finally:
            stop_s, rc = run.stop()
        dt = t1 - t0
        cpu = (c1["cpu_s"] - c0["cpu_s"]) + (c1["children_cpu_s"] - c0["children_cpu_s"])
        mine = [r for r in stats["requests"] if r.get("workspace_id") in (fx.ws, None)]
        return {
            "seconds": round(dt, 2),
            "VmRSS_kB": st.get("VmRSS_kB"), "VmRSS_max_kB": max(rss) if rss else None,
            "VmHWM_kB": st.get("VmHWM_kB"), "RssAnon_kB": st.get("RssAnon_kB"), "RssFile_kB": st.get("RssFile_kB"),
            "VmSize_kB": st.get("VmSize_kB"), "threads": st.get("Threads"), "threads_max": max(threads) if threads else None,
            "fds": fds,
            "cpu_s": round(cpu, 3), "cpu_pct_of_core": round(100 * cpu / dt, 4) if dt else None,
            "cpu_s_per_min": round(60 * cpu / dt, 4) if dt else None,
            "requests": stats["requests_total"],
            "requests_per_min": round(60 * stats["requests_total"] / dt, 2) if dt else None,
            "requests_by_route": api_requests(stats),
            "other_workspace_requests": len(stats["requests"]) - len(mine),
            "smaps_rollup": smaps,
            "sigterm_exit_ms": round(stop_s * 1000, 2) if stop_s is not None else None,
            "exit_code": rc,
            "contention": noise,
        }

    def idle(self, conn):
        runs = []
        for k in range(self.args.repeat):
            r = self.idle_once(conn)
            log(f"{conn.name} idle #{k + 1}: RSS {r['VmRSS_kB']} kB HWM {r['VmHWM_kB']} kB, "
                f"{r['threads']} threads, CPU {r['cpu_s']} s ({r['cpu_pct_of_core']} %), {r['requests_per_min']} req/min")
            runs.append(r)
        keys = ["VmRSS_kB", "VmHWM_kB", "threads", "cpu_s", "cpu_pct_of_core", "cpu_s_per_min", "requests_per_min",
                "sigterm_exit_ms"]
        out = {k: summary(r[k] for r in runs) for k in keys}
        out["idle_secs"] = self.args.idle_secs
        out["runs"] = runs
        return out

    # -------------------------------------------------------------- start-up and SIGTERM
    def startup_once(self, conn):
        emu = self.emu
        self.settle()
        fx = self.fixture("startup")
        emu.reset_stats()
        run = self.start(conn, fx, "mock" if conn.has("backend_args") else "exec", 1, capture=True)
        try:
            first_poll = wait_first_poll(emu, fx.ws)
            if first_poll is None:
                raise RuntimeError(f"{conn.name}: no poll within 10 s; log: {run.log_tail()}")
            stats = emu.stats()
            reg = [r["at_ms"] for r in stats["requests"] if r["path"] == "/registry/register"]
            time.sleep(self.rng.uniform(0.5, 1.5))  # idle, at a random poll phase
            alive_before = run.alive()
            noise = self.contention()
        finally:
            stop_s, rc = run.stop()
        lines = list(run.lines)
        first_ok = next((t for t, l in lines if "first poll returned" in l), None)
        connected = next((t for t, l in lines if "connected:" in l), None)
        reqs = [f"{r['method']} {r['path']} +{r['at_ms'] - run.t0_ms:.1f}ms" for r in stats["requests"][:6]]
        return {
            "to_register_ms": round(reg[0] - run.t0_ms, 2) if reg else None,
            "to_first_poll_ms": round(first_poll - run.t0_ms, 2),
            "to_connected_log_ms": round(connected - run.t0_ms, 2) if connected else None,
            "to_first_poll_log_ms": round(first_ok - run.t0_ms, 2) if first_ok else None,
            "first_requests": reqs,
            "sigterm_exit_ms": round(stop_s * 1000, 2) if stop_s is not None else None,
            "exit_code": rc, "alive_before_sigterm": alive_before,
            "contention": noise,
        }

    def startup(self, conn):
        runs = []
        for k in range(max(self.args.repeat, self.args.startup_runs)):
            r = self.startup_once(conn)
            log(f"{conn.name} start-up #{k + 1}: register +{r['to_register_ms']} ms, first poll "
                f"+{r['to_first_poll_ms']} ms; SIGTERM -> exit {r['sigterm_exit_ms']} ms (rc {r['exit_code']})")
            runs.append(r)
        keys = ["to_register_ms", "to_first_poll_ms", "to_first_poll_log_ms", "sigterm_exit_ms"]
        out = {k: summary(r[k] for r in runs) for k in keys}
        out["clean_exits"] = sum(1 for r in runs if r["exit_code"] == 0)
        out["runs"] = runs
        return out

    # -------------------------------------------------------------- raw emulator rate
    def emulator_raw(self):
        a, emu = self.args, self.emu
        self.settle()
        parent = emu.create_ws("bench-raw-team")["id"]
        g = emu.create_ws("bench-raw-get", parent)
        p1 = emu.create_ws("bench-raw-p1", parent)
        p2 = emu.create_ws("bench-raw-p2", parent)
        tail = emu.enqueue(g["id"], None, "raw-tail tail row")["activity_id"]
        # a page like the connector's: 100 rows after the cursor
        emu.enqueue_batch(g["id"], [{"from": None, "text": f"raw-{i} row"} for i in range(100)])
        threads_n, per_thread = a.raw_threads, a.raw_requests // a.raw_threads

        def hammer(make_request):
            errors = [0]
            barrier = threading.Barrier(threads_n + 1)

            def worker(idx):
                c = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=30)
                barrier.wait()
                for i in range(per_thread):
                    method, path, body, headers = make_request(idx, i)
                    try:
                        c.request(method, path, body=body, headers=headers)
                        r = c.getresponse()
                        r.read()
                        if r.status != 200:
                            errors[0] += 1
                    except (http.client.HTTPException, OSError):
                        errors[0] += 1
                        c.close()
                        c = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=30)
                c.close()

            ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads_n)]
            for t in ts:
                t.start()
            barrier.wait()
            t0 = time.monotonic()
            for t in ts:
                t.join(300)
            dt = time.monotonic() - t0
            n = threads_n * per_thread
            return {"requests": n, "errors": errors[0], "seconds": round(dt, 3), "req_per_s": round(n / dt, 1)}

        auth_g = {"Authorization": f"Bearer {g['token']}", "X-Workspace-ID": g["id"]}
        # GET activity with since_id: (a) the cursor at the tail (an idle poll), (b) a full page of 100 rows
        rows = emu.admin.ok("GET", f"/_admin/workspaces/{g['id']}/rows")["rows"]
        last_row = rows[-1]["id"]
        get_idle = hammer(lambda i, j: ("GET", f"/workspaces/{g['id']}/activity?since_id={last_row}&limit=100",
                                        None, auth_g))
        get_page = hammer(lambda i, j: ("GET", f"/workspaces/{g['id']}/activity?since_id={tail}&limit=100",
                                        None, auth_g))
        auth_p1 = {"Authorization": f"Bearer {p1['token']}", "X-Workspace-ID": p1["id"],
                   "Content-Type": "application/json"}

        def a2a(i, j):
            body = json.dumps({"jsonrpc": "2.0", "id": f"{i}-{j}", "method": "message/send", "params": {"message": {
                "role": "user", "messageId": str(uuid.uuid4()), "parts": [{"kind": "text", "text": f"raw {i}-{j}"}],
                "metadata": {"in_reply_to": str(uuid.uuid4())}}}})
            return "POST", f"/workspaces/{p2['id']}/a2a", body, auth_p1

        post_a2a = hammer(a2a)
        # What a message costs the emulator at best: one reply POST plus 1/100 of a full page.
        ceiling = 1 / (1 / post_a2a["req_per_s"] + 0.01 / get_page["req_per_s"])
        return {
            "client": f"python http.client, {threads_n} keep-alive threads (a lower bound: the client shares the 2 cores)",
            "get_activity_idle_poll": get_idle,
            "get_activity_full_page_100": get_page,
            "post_a2a": post_a2a,
            "message_ceiling_per_s": round(ceiling, 1),
        }


def request_log_breakdown(stats, ws):
    """From the emulator's last 1000 requests: how replies are spaced and how long after
    the poll that fetched them the first reply of a page goes out."""
    reqs = [r for r in stats["requests"] if r.get("workspace_id") in (ws, None) or "/a2a" in r["path"]]
    polls = [r["at_ms"] for r in reqs if r["method"] == "GET" and r["path"].endswith("/activity")]
    replies = [r["at_ms"] for r in reqs if r["method"] == "POST" and (r["path"].endswith("/a2a") or r["path"].endswith("/notify"))]
    if not replies:
        return None
    gaps = [b - a for a, b in zip(replies, replies[1:])]
    first_after_poll = []
    for p in polls:
        nxt = next((x for x in replies if x >= p), None)
        if nxt is not None:
            first_after_poll.append(nxt - p)
    span = (replies[-1] - replies[0]) / 1000 if len(replies) > 1 else None
    return {
        "window_requests": len(reqs),
        "polls_in_window": len(polls),
        "replies_in_window": len(replies),
        "reply_rate_in_window_per_s": round((len(replies) - 1) / span, 1) if span else None,
        "reply_gap_ms": {"p50": percentile(gaps, 50), "p95": percentile(gaps, 95), "max": max(gaps) if gaps else None},
        "poll_to_first_reply_ms": {"p50": percentile(first_after_poll, 50), "max": max(first_after_poll) if first_after_poll else None},
    }


# ------------------------------------------------------------------ binary size


def binary_size(path, build):
    if not os.path.exists(path) and build:
        log("building the static musl binary (missing)")
        subprocess.run(["cargo", "build", "--release", "--target", "x86_64-unknown-linux-musl", "--bin", "molecule"],
                       cwd=ROOT, check=True)
    if not os.path.exists(path):
        return {"path": path, "bytes": None, "error": "missing"}
    size = os.path.getsize(path)
    desc = ""
    if shutil.which("file"):
        desc = subprocess.run(["file", "-b", path], capture_output=True, text=True).stdout.strip()
    stripped_size = size
    if "not stripped" in desc and shutil.which("strip"):
        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, "m")
            shutil.copy(path, tmp)
            subprocess.run(["strip", tmp], check=True)
            stripped_size = os.path.getsize(tmp)
    return {"path": os.path.relpath(path, ROOT), "bytes": size, "stripped_bytes": stripped_size,
            "static": "static" in desc, "file": desc[:120]}


# ------------------------------------------------------------------ targets and report


def targets(res, interval_ms):
    m = res["connectors"]["molecule"]
    t = []

    def add(name, value, limit, op="<=", unit=""):
        ok = value is not None and (value <= limit if op == "<=" else value >= limit)
        t.append({"target": name, "value": value, "limit": f"{op} {limit}{unit}", "pass": ok})

    b = m.get("binary")
    if b is not None:
        add("static musl binary, stripped (bytes)", b.get("stripped_bytes"), SIZE_BUDGET)
    idle = m.get("idle")
    if idle is not None:
        add("idle RSS (kB, VmRSS median)", idle["VmRSS_kB"]["median"], 4096)
        add("idle CPU (% of one core)", idle["cpu_pct_of_core"]["median"], 0.1)
    bl = m.get("backlog")
    if bl is not None:
        for key, limit, name in (("mock_seq", 1000, "backlog mock sequential (msg/s)"),
                                 ("exec_seq", 300, "backlog exec cat sequential (msg/s)")):
            if key in bl:
                v = bl[key]["msgs_per_s"]["median"]
                add(name, v, limit, ">=")
                t[-1]["pass"] = t[-1]["pass"] and bl[key]["pass_correctness"]
        for key in ("mock_c4", "exec_c4"):
            if key in bl:
                t.append({"target": f"backlog {key} correctness (lost/dup/wrong)",
                          "value": f"{bl[key]['lost']}/{bl[key]['duplicated']}/{bl[key]['wrong_text']}",
                          "limit": "0/0/0", "pass": bl[key]["pass_correctness"]})
    lat = m.get("latency")
    if lat is not None:
        add("latency p50 (ms)", lat["p50_ms"]["median"], interval_ms / 2 + 25)
        t[-1]["pass"] = t[-1]["pass"] and lat["pass_correctness"]
        add("latency p95 (ms)", lat["p95_ms"]["median"], interval_ms + 50)
        t[-1]["pass"] = t[-1]["pass"] and lat["pass_correctness"]
    sp = m.get("spawn")
    if sp is not None:
        add("exec cat vs raw spawn of cat (fraction)", sp["fraction_of_raw_spawn"], 0.5, ">=")
        t[-1]["pass"] = t[-1]["pass"] and sp["exec_cat"]["pass_correctness"]
    w = m.get("worker")
    if w is not None:
        ok = all(w[k]["pass_correctness"] for k in ("exec_py", "worker_py", "worker_cat", "mock"))
        add("worker vs exec, Python agent (x throughput)", w["worker_vs_exec_python"], 20, ">=")
        t[-1]["pass"] = t[-1]["pass"] and ok
        add("worker handling overhead (ms per message)", w["handling_overhead_ms"], 0.3)
        t[-1]["pass"] = t[-1]["pass"] and ok
        frac = w["worker_cat"].get("fraction_of_emulator_ceiling")
        if frac is not None:
            add("cat worker vs emulator ceiling, sequential (fraction)", frac, 0.6, ">=")
            t[-1]["pass"] = t[-1]["pass"] and ok
    st = m.get("startup")
    if st is not None:
        add("SIGTERM -> exit, idle (ms)", st["sigterm_exit_ms"]["median"], 200)
        t[-1]["pass"] = t[-1]["pass"] and st["clean_exits"] == len(st["runs"])
        add("start -> first poll (ms)", st["to_first_poll_ms"]["median"], 50)
    return t


def table(res):
    lines = []
    names = list(res["connectors"])
    lines.append(f"{'measure':44s}" + "".join(f"{n[:26]:>28s}" for n in names))

    def fmt(s, unit=""):
        if s is None:
            return "-"
        if isinstance(s, dict) and "median" in s:
            if s["median"] is None:
                return "-"
            return f"{s['median']:g} [{s['min']:g}..{s['max']:g}]{unit}"
        return f"{s}{unit}"

    def row(label, getter):
        cells = []
        for n in names:
            try:
                cells.append(fmt(getter(res["connectors"][n])))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"{label:44s}" + "".join(f"{c:>28s}" for c in cells))

    row("binary stripped (bytes)", lambda c: c["binary"]["stripped_bytes"])
    keys = sorted({k for c in res["connectors"].values() for k in (c.get("backlog") or {})})
    for k in keys:
        row(f"backlog {k} msg/s", lambda c, k=k: c["backlog"][k]["msgs_per_s"])
        row(f"  lost/dup/wrong", lambda c, k=k: f"{c['backlog'][k]['lost']}/{c['backlog'][k]['duplicated']}/{c['backlog'][k]['wrong_text']}")
    row("latency p50 ms", lambda c: c["latency"]["p50_ms"])
    row("latency p95 ms", lambda c: c["latency"]["p95_ms"])
    row("  lost/dup/wrong", lambda c: f"{c['latency']['lost']}/{c['latency']['duplicated']}/{c['latency']['wrong_text']}")
    row("idle VmRSS kB", lambda c: c["idle"]["VmRSS_kB"])
    row("idle VmHWM kB", lambda c: c["idle"]["VmHWM_kB"])
    row("idle threads", lambda c: c["idle"]["threads"])
    row("idle CPU % of a core", lambda c: c["idle"]["cpu_pct_of_core"])
    row("idle requests/min", lambda c: c["idle"]["requests_per_min"])
    row("spawn: raw cat spawns/s", lambda c: c["spawn"]["raw_spawns_per_s"])
    row("spawn: exec cat msg/s", lambda c: c["spawn"]["exec_cat"]["msgs_per_s"])
    row("spawn: exec cat / raw spawn", lambda c: c["spawn"]["fraction_of_raw_spawn"])
    for k in ("exec_py", "worker_py", "worker_cat", "mock"):
        row(f"worker phase: {k} msg/s", lambda c, k=k: c["worker"][k]["msgs_per_s"])
    row("worker phase: worker/exec (Python)", lambda c: c["worker"]["worker_vs_exec_python"])
    row("worker phase: overhead ms/msg", lambda c: c["worker"]["handling_overhead_ms"])
    row("worker phase: overhead CPU ms/msg", lambda c: c["worker"]["handling_overhead_cpu_ms"])
    row("start -> register ms", lambda c: c["startup"]["to_register_ms"])
    row("start -> first poll ms", lambda c: c["startup"]["to_first_poll_ms"])
    row("SIGTERM -> exit ms", lambda c: c["startup"]["sigterm_exit_ms"])
    raw = res.get("emulator_raw")
    if raw:
        lines.append(f"emulator raw: GET idle poll {raw['get_activity_idle_poll']['req_per_s']}/s, GET page of 100 "
                     f"{raw['get_activity_full_page_100']['req_per_s']}/s, POST a2a {raw['post_a2a']['req_per_s']}/s, "
                     f"message ceiling ~{raw['message_ceiling_per_s']}/s")
    lines.append("")
    for t in res["targets"]:
        lines.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']} ({t['limit']})")
    lines.append(f"overall: {'PASS' if res['pass'] else 'FAIL'}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="benchmark molecule connect against molecule-emulator")
    p.add_argument("--messages", type=int, default=2000, help="backlog size (default 2000)")
    p.add_argument("--peers", type=int, default=4, help="peer senders besides the canvas (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per phase (default 3)")
    p.add_argument("--latency-samples", type=int, default=50, help="samples per latency run (default 50)")
    p.add_argument("--interval-ms", type=int, default=1000, help="poll interval (default 1000, the default of connect)")
    p.add_argument("--idle-secs", type=float, default=60, help="idle measurement window (default 60)")
    p.add_argument("--startup-runs", type=int, default=5, help="start-up/SIGTERM runs (at least --repeat; default 5)")
    p.add_argument("--raw-requests", type=int, default=8000, help="requests per raw emulator measurement")
    p.add_argument("--raw-threads", type=int, default=4)
    p.add_argument("--phases", default="binary,raw,backlog,latency,idle,startup,spawn,worker",
                   help="comma-separated subset of binary,raw,backlog,latency,idle,startup,spawn,worker "
                        "(spawn: exec cat against the raw spawn rate of cat; worker: a Python agent as "
                        "exec and as worker, a cat worker against mock and the emulator's ceiling)")
    p.add_argument("--exec-py-messages", type=int, default=100,
                   help="backlog of the Python agent run as exec, in the worker phase (default 100)")
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 200 messages, 5 s idle, 10 latency samples, repeat 1")
    p.add_argument("--vs", help="second connector command template; placeholders {url} {workspace} {token} "
                                "{token_file} {state_dir}, optional {backend_args} {concurrency} {interval_ms}")
    p.add_argument("--vs-name", default="vs")
    p.add_argument("--vs-binary", help="binary of the --vs connector, for its size")
    p.add_argument("--bin-dir", default=os.path.join(TARGET, "release"))
    p.add_argument("--musl-bin", default=os.path.join(TARGET, "x86_64-unknown-linux-musl", "release", "molecule"))
    p.add_argument("--no-build", action="store_true", help="do not build the musl binary when it is missing")
    p.add_argument("--quiet-wait", type=float, default=120,
                   help="before each run wait up to this many seconds for other processes to use less than "
                        "--quiet-pct of a core (0 = do not wait; default 120)")
    p.add_argument("--quiet-pct", type=float, default=15.0)
    p.add_argument("--quiet-budget", type=float, default=300,
                   help="total seconds the whole run may spend waiting for a quiet machine (default 300)")
    p.add_argument("--binary", choices=["musl", "host"], default="musl",
                   help="which release build of molecule runs the phases: the static musl binary that ships "
                        "(default) or the host (glibc, dynamically linked) build")
    p.add_argument("--molecule-bin", help="run this molecule binary instead (overrides --binary)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    a = p.parse_args(argv)
    if a.quick:
        a.messages = min(a.messages, 200)
        a.idle_secs = min(a.idle_secs, 5)
        a.latency_samples = min(a.latency_samples, 10)
        a.repeat = 1
        a.startup_runs = 1
        a.raw_requests = min(a.raw_requests, 2000)
    if a.seed is None:
        a.seed = int(time.time())
    for name in ("messages", "repeat", "latency_samples", "interval_ms", "raw_threads", "peers"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.raw_requests < a.raw_threads:
        p.error("--raw-requests must be >= --raw-threads")
    if a.idle_secs <= 0 or a.idle_secs > 3600:
        p.error("--idle-secs must be in (0, 3600]")
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    return a


def main(argv):
    a = parse_args(argv)
    emu_bin = os.path.join(a.bin_dir, "molecule-emulator")
    if a.molecule_bin:
        mol = a.molecule_bin
    elif a.binary == "musl":
        if not os.path.exists(a.musl_bin) and not a.no_build:
            binary_size(a.musl_bin, True)
        mol = a.musl_bin
    else:
        mol = os.path.join(a.bin_dir, "molecule")
    for b in (mol, emu_bin):
        if not os.access(b, os.X_OK):
            log(f"missing {b}: run scripts/bench.sh (it builds the release binaries)")
            return 2
    connectors = [Connector("molecule", "molecule", binary=mol)]
    if a.vs:
        if "{workspace}" not in a.vs or "{url}" not in a.vs:
            log("--vs needs at least {url} and {workspace}")
            return 2
        connectors.append(Connector(a.vs_name, "vs", template=a.vs))
    workdir = tempfile.mkdtemp(prefix="molecule-bench-")
    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    res = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "git": git.stdout.strip() or None,
            "loadavg_start": loadavg(),
            "settings": {k: v for k, v in vars(a).items() if k not in ("bin_dir", "musl_bin")},
            "workdir": workdir,
            "molecule_binary": os.path.relpath(mol, ROOT),
        },
        "connectors": {c.name: {} for c in connectors},
    }
    emu = None
    t_start = time.monotonic()
    try:
        emu = Emulator(emu_bin, workdir)
        res["meta"]["emulator"] = emu.url
        bench = Bench(a, emu, workdir)
        if "binary" in a.phases:
            res["connectors"]["molecule"]["binary"] = binary_size(a.musl_bin, not a.no_build)
            host = os.path.join(a.bin_dir, "molecule")
            res["connectors"]["molecule"]["binary"]["host_release_bytes"] = \
                os.path.getsize(host) if os.path.exists(host) else None
            if a.vs and a.vs_binary:
                res["connectors"][a.vs_name]["binary"] = binary_size(a.vs_binary, False)
        if "raw" in a.phases:
            log("emulator raw request rate")
            res["emulator_raw"] = bench.emulator_raw()
        for phase in ("backlog", "latency", "idle", "startup", "spawn", "worker"):
            if phase not in a.phases:
                continue
            for c in connectors:
                if phase in ("spawn", "worker") and c.kind != "molecule":
                    continue
                log(f"phase {phase}: {c.name}")
                res["connectors"][c.name][phase] = getattr(bench, phase)(c)
        raw = res.get("emulator_raw")
        if raw:
            for c in res["connectors"].values():
                for k, v in (c.get("backlog") or {}).items():
                    med = v["msgs_per_s"]["median"]
                    v["fraction_of_emulator_ceiling"] = round(med / raw["message_ceiling_per_s"], 3) if med else None
                    v["fraction_of_emulator_post_a2a"] = round(med / raw["post_a2a"]["req_per_s"], 3) if med else None
                w = c.get("worker")
                if w:
                    med = w["worker_cat"]["msgs_per_s"]["median"]
                    w["worker_cat"]["fraction_of_emulator_ceiling"] = \
                        round(med / raw["message_ceiling_per_s"], 3) if med else None
                    med = w["mock"]["msgs_per_s"]["median"]
                    w["mock"]["fraction_of_emulator_ceiling"] = \
                        round(med / raw["message_ceiling_per_s"], 3) if med else None
    except KeyboardInterrupt:
        log("interrupted")
        res["error"] = "interrupted"
    except Exception as e:  # report what we have, then fail
        log(f"error: {e!r}")
        res["error"] = repr(e)
    finally:
        if emu is not None:
            emu.stop()
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    res["meta"]["loadavg_end"] = loadavg()
    res["meta"]["duration_s"] = round(time.monotonic() - t_start, 1)
    res["targets"] = targets(res, a.interval_ms)
    res["pass"] = "error" not in res and bool(res["targets"]) and all(t["pass"] for t in res["targets"])
    doc = json.dumps(res, indent=2)
    with open(a.out, "w") as f:
        f.write(doc + "\n")
    print(table(res), file=sys.stderr)
    print(doc)
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
