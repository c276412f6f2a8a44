#!/usr/bin/env python3
"""A `molecule connect --backend worker` agent: standard library only.

Start it with
    molecule connect --backend worker --backend-opt cmd='python3 scripts/examples/worker.py' \
        --backend-opt ready=true

Protocol (one JSON object per line, UTF-8):
  molecule -> stdin:  {"id": "7", "text": "...", "caller_id": ..., "origin": "peer", ...}
  stdout -> molecule: {"id": "7", "text": "the reply"}
                      or {"id": "7", "no_reply": true}
                      or {"id": "7", "retry_later": true}
                      or {"id": "7", "error": "what went wrong"}
Stdout is for answers only: log to stderr (it goes to molecule's log). Exit when
stdin closes. The first line {"ready": true} (with ready=true) says start-up is over.

Set WORKER_REPLY to a template ("%s" becomes the text) to change the answer.
"""

import json
import os
import sys


def answer(request, template):
    """Turns one request into one answer object (without the id)."""
    if request.get("origin") == "delegation_result":
        # A result of a delegation we sent: note it, post nothing.
        print("delegation result: " + request.get("text", "")[:200], file=sys.stderr)
        return {"no_reply": True}
    return {"text": template.replace("%s", request.get("text", ""))}


def main():
    template = os.environ.get("WORKER_REPLY", "echo: %s")
    # Slow start-up (imports, model clients, loading context) happens here, once.
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            reply = answer(request, template)
        except Exception as e:  # one bad message must not kill the worker
            reply = {"error": "%s: %s" % (type(e).__name__, e)}
        reply["id"] = request["id"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
