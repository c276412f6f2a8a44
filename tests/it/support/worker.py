"""A worker for the integration tests: `molecule connect --backend worker`.

Behaviour by message text (state in $TEST_DIR):
  crash-once  the first time: exit 3 (mid-request); then answer
  hang-once   the first time: sleep for minutes (until killed); then answer
  slow        touch $TEST_DIR/got-<text>, sleep 1 s, then answer
  garbage     print a line that is not JSON
  big         answer with 5000 bytes of text
  bad-part    answer with a file part that has no uri or bytes (not valid A2A)
  file-part   answer with a valid file part and a data part written with `type`
  anything    answer "w:<text>"
A delegation result is appended to $TEST_DIR/delegations and not answered.
Every start appends its pid to $TEST_DIR/pids; with TEST_ALONE set it first appends
the earlier ones still running to $TEST_DIR/overlap. Requests are answered one at a time.

With TEST_THREADS set, each request is answered "w:<text>" by its own thread after a
random pause (0 to 200 ms), so answers come out of order; a request whose sender has
another one in flight appends the sender to $TEST_DIR/same-sender; a text starting
"pair" waits (up to 5 s) for a second "pair" request to be in flight with it, and is
answered "alone:<text>" if none comes.
"""

import json
import os
import sys
import time

d = os.environ["TEST_DIR"]


def running(pid):
    """Alive and not a zombie."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


if os.environ.get("TEST_ALONE") and os.path.exists(os.path.join(d, "pids")):
    with open(os.path.join(d, "pids")) as f:
        earlier = [p for p in f.read().split() if running(p)]
    if earlier:
        with open(os.path.join(d, "overlap"), "a") as f:
            f.write(" ".join(earlier) + "\n")
with open(os.path.join(d, "pids"), "a") as f:
    f.write("%d\n" % os.getpid())
if os.environ.get("TEST_READY"):
    print(json.dumps({"ready": True}), flush=True)


def threaded():
    import random
    import threading

    lock = threading.Condition()
    busy = set()
    pairs = [0]

    def serve(req):
        caller, text = req.get("caller_id"), req["text"]
        with lock:
            if caller in busy:
                with open(os.path.join(d, "same-sender"), "a") as f:
                    f.write("%s\n" % caller)
            busy.add(caller)
        reply = "w:" + text
        if text.startswith("pair"):
            with lock:
                pairs[0] += 1
                lock.notify_all()
                if not lock.wait_for(lambda: pairs[0] >= 2, timeout=5):
                    reply = "alone:" + text
        time.sleep(random.uniform(0, 0.2))
        with lock:
            # Before the answer: the next request of this sender may follow it.
            busy.discard(caller)
            print(json.dumps({"id": req["id"], "text": reply}), flush=True)

    for line in sys.stdin:
        threading.Thread(target=serve, args=(json.loads(line),)).start()


if os.environ.get("TEST_THREADS"):
    threaded()
    sys.exit(0)


def once(name):
    """True the first time `name` is seen, across restarts."""
    path = os.path.join(d, "seen-" + name)
    if os.path.exists(path):
        return False
    open(path, "w").close()
    return True


for line in sys.stdin:
    req = json.loads(line)
    text = req["text"]
    out = {"id": req["id"], "text": "w:" + text}
    if req.get("origin") == "delegation_result":
        with open(os.path.join(d, "delegations"), "a") as f:
            f.write(line)
        out = {"id": req["id"], "no_reply": True}
    elif text.startswith("slow"):
        open(os.path.join(d, "got-" + text), "w").close()
        time.sleep(1)
    elif text == "crash-once" and once(text):
        print("crashing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    elif text == "hang-once" and once(text):
        time.sleep(600)
    elif text == "garbage":
        print("this is not json", flush=True)
        continue
    elif text == "big":
        out["text"] = "x" * 5000
    elif text == "bad-part":
        out["parts"] = [{"kind": "file", "file": {"name": "a.txt"}}]
    elif text == "file-part":
        out["parts"] = [
            {"kind": "file", "file": {"uri": "https://files.test/a.txt", "name": "a.txt"}},
            {"type": "data", "data": {"n": 1}},
        ]
    print(json.dumps(out), flush=True)
