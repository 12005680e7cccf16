#!/usr/bin/env python3
"""A chunkmill command that misbehaves on demand, for testing how mappers cope.

It echoes each object unchanged, except when the object's fault field (default `fault`, see
--field) says otherwise:

  "crash"       exit with status 3 without answering
  "crash-once"  the same, but only the first time this exact line is seen (needs --state DIR,
                where it leaves a marker file per line), so a retry succeeds
  "hang"        sleep for an hour without answering
  "garbage"     answer `not json`
  "stderr"      write a line to stderr, then answer normally
  "extra"       answer normally, then write one line more (`{"extra":"line"}`): out of step
  "silent"      write no line for this object and go on with the next: out of step
  "close"       close stdout and stay alive without answering
  "flood"       write 20 000 lines to stderr, then answer normally

Usage: faulty.py [--field NAME] [--state DIR] [--pid-file FILE]
"""
import argparse
import hashlib
import json
import os
import sys
import time

parser = argparse.ArgumentParser(description="echo JSON lines, misbehaving on demand")
parser.add_argument("--field", default="fault", help="the field that names the fault")
parser.add_argument("--state", help="directory for crash-once markers")
parser.add_argument("--pid-file", help="a file to append this process's id to, at start")
args = parser.parse_args()
if args.pid_file:
    with open(args.pid_file, "a") as f:
        f.write(f"{os.getpid()}\n")

for line in sys.stdin:
    fault = json.loads(line).get(args.field)
    if fault == "crash":
        sys.exit(3)
    if fault == "crash-once":
        if not args.state:
            sys.exit("faulty.py: crash-once needs --state DIR")
        marker = os.path.join(args.state, hashlib.sha256(line.encode()).hexdigest())
        if not os.path.exists(marker):
            open(marker, "w").close()
            sys.exit(3)
    if fault == "hang":
        time.sleep(3600)
    if fault == "garbage":
        print("not json", flush=True)
        continue
    if fault == "stderr":
        print(f"faulty.py: asked to write to stderr by {line.strip()}", file=sys.stderr, flush=True)
    if fault == "silent":
        continue
    if fault == "close":
        sys.stdout.flush()
        os.close(1)
        time.sleep(3600)
    if fault == "flood":
        sys.stderr.write("faulty.py: a flood of stderr\n" * 20000)
        sys.stderr.flush()
    print(line.strip(), flush=True)
    if fault == "extra":
        print('{"extra":"line"}', flush=True)
