#!/usr/bin/env python3
"""A chunkmill command: one JSON object per line on stdin, one JSON value per line on stdout."""
import json
import sys

for line in sys.stdin:
    obj = json.loads(line)
    if "order_id" in obj and isinstance(obj.get("items"), list):
        items = obj["items"]
        total = sum(item["qty"] * item["price"] for item in items)
        out = {"order_id": obj["order_id"], "items": len(items), "total": total}
    else:
        out = dict(obj, seen_by="enrich.py")
    print(json.dumps(out, separators=(",", ":")), flush=True)
