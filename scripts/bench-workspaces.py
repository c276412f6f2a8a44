#!/usr/bin/env python3
"""Footprint of one `molecule connect --workspaces` process serving 1, 10 and 50
workspaces against the local emulator: RSS (VmRSS, VmHWM), threads and CPU seconds
over an idle window at 1 s polling, after every workspace has answered one message.
Loopback only; every wait is bounded. Prints a JSON document and a table."""
import json, os, signal, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where cargo puts the binaries (CARGO_TARGET_DIR and cargo configs move it).
BIN = os.path.join(subprocess.run([os.path.join(ROOT, "scripts", "target-dir.sh")], capture_output=True,
                                  text=True).stdout.strip() or os.path.join(ROOT, "target"), "release")
IDLE = float(os.environ.get("IDLE_SECS", "30"))
COUNTS = [int(x) for x in os.environ.get("COUNTS", "1,10,50").split(",")]
TICK = os.sysconf("SC_CLK_TCK")


def call(url, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    kb = lambda k: int(out[k].split()[0])
    return {"rss_kb": kb("VmRSS"), "hwm_kb": kb("VmHWM"), "threads": int(out["Threads"]), "cpu_s": cpu}


def measure(n):
    emu = subprocess.Popen([os.path.join(BIN, "molecule-emulator"), "--port", "0", "--quiet"], stdout=subprocess.PIPE, text=True)
    try:
        url = emu.stdout.readline().split()[-1]
        root = call(url + "/_admin/workspaces", "POST", {"name": "root"})["id"]
        peer = call(url + "/_admin/workspaces", "POST", {"name": "peer", "parent_id": root, "delivery_mode": "poll"})["id"]
        tmp = tempfile.mkdtemp(prefix="molecule-ws-bench-")
        entries = []
        for i in range(n):
            ws = call(url + "/_admin/workspaces", "POST", {"name": f"a{i}", "parent_id": root})
            tf = os.path.join(tmp, f"token-{i}")
            with open(tf, "w") as f:
                f.write(ws["token"])
            os.chmod(tf, 0o600)
            entries.append({"id": ws["id"], "token_file": tf})
        lst = os.path.join(tmp, "workspaces.json")
        with open(lst, "w") as f:
            json.dump(entries, f)
        cmd = [os.path.join(BIN, "molecule"), "connect", "--workspaces", lst, "--api-url", url,
               "--state-dir", os.path.join(tmp, "state"), "--backend", "mock", "-q"]
        mol = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for e in entries:
                call(url + f"/_admin/workspaces/{e['id']}/enqueue", "POST", {"from": peer, "text": "ping"})
            deadline = time.monotonic() + 60
            while len(call(url + f"/_admin/workspaces/{peer}/received")["messages"]) < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{n} workspaces: not every message answered")
                time.sleep(0.05)
            call(url + "/_admin/reset_stats", "POST", {})
            before = proc_status(mol.pid)
            time.sleep(IDLE)
            after = proc_status(mol.pid)
            reqs = call(url + "/_admin/stats")["requests_total"]
            cpu = after["cpu_s"] - before["cpu_s"]
            return {"workspaces": n, "rss_kb": after["rss_kb"], "hwm_kb": after["hwm_kb"], "threads": after["threads"],
                    "idle_secs": IDLE, "cpu_s": round(cpu, 3), "cpu_pct_one_core": round(100 * cpu / IDLE, 3),
                    "requests_per_min": round(reqs * 60 / IDLE, 1)}
        finally:
            mol.send_signal(signal.SIGTERM)
            mol.wait(timeout=30)
    finally:
        emu.kill()
        emu.wait()


def main():
    results = [measure(n) for n in COUNTS]
    print(json.dumps({"idle_secs": IDLE, "results": results}, indent=2))
    print(f"{'workspaces':>10} {'VmRSS MB':>9} {'VmHWM MB':>9} {'threads':>8} {'CPU %':>7} {'req/min':>8}", file=sys.stderr)
    for r in results:
        print(f"{r['workspaces']:>10} {r['rss_kb']/1024:>9.1f} {r['hwm_kb']/1024:>9.1f} {r['threads']:>8} "
              f"{r['cpu_pct_one_core']:>7.2f} {r['requests_per_min']:>8.0f}", file=sys.stderr)


if __name__ == "__main__":
    main()
