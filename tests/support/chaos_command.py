#!/usr/bin/env python3
"""The chaos test's command child: heavy, deterministic work per object (SHA-256 of the object's
uuid iterated ROUNDS times), one JSON line out per line in. SIGUSR1 makes it flood its stderr
(20 000 lines) before its next answer; the test crashes it with SIGKILL and hangs it with SIGSTOP.

Usage: chaos_command.py ROUNDS
"""
import hashlib
import json
import signal
import sys

rounds = int(sys.argv[1])
flood = False


def ask_flood(_signum, _frame):
    global flood
    flood = True


signal.signal(signal.SIGUSR1, ask_flood)

for line in sys.stdin:
    obj = json.loads(line)
    digest = obj.get("uuid", "").encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    if flood:
        flood = False
        sys.stderr.write("chaos_command.py: a flood of stderr\n" * 20000)
        sys.stderr.flush()
    print(json.dumps({"id": obj.get("uuid"), "digest": digest.hex()}, separators=(",", ":")), flush=True)
