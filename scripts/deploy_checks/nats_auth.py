"""Renders the `config.merge` block of deploy/nats/values.yaml into a nats-server config file the
way the NATS chart renders it (pretty JSON; a string "<< X >>" becomes X unquoted, so
`<< $CHUNKMILL_FETCHER_PASSWORD >>` is a variable nats-server takes from its environment).

The result is deploy/nats/chunkmill-auth.conf, which tests/security.rs runs a real nats-server
with; check 4a of scripts/check-deploy.sh fails when the file and values.yaml disagree.

    python3 scripts/deploy_checks/nats_auth.py           # print the rendering
    python3 scripts/deploy_checks/nats_auth.py --write   # rewrite deploy/nats/chunkmill-auth.conf
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "deploy" / "nats" / "values.yaml"
CONF = ROOT / "deploy" / "nats" / "chunkmill-auth.conf"

HEADER = """\
# GENERATED from config.merge in deploy/nats/values.yaml by
#   python3 scripts/deploy_checks/nats_auth.py --write
# Do not edit: change values.yaml and regenerate (scripts/check-deploy.sh fails while the two
# differ). The NATS chart renders the same block into the server's config. Run a local server
# with it (the passwords come from the environment):
#   CHUNKMILL_FETCHER_PASSWORD=... CHUNKMILL_MAPPER_PASSWORD=... CHUNKMILL_SAVER_PASSWORD=... \\
#   CHUNKMILL_BROADCASTER_PASSWORD=... nats-server -js -c deploy/nats/chunkmill-auth.conf
"""


def render(values: dict) -> str:
    merge = ((values.get("config") or {}).get("merge")) or {}
    text = json.dumps(merge, indent=2, sort_keys=True)
    return HEADER + re.sub(r'"<<\s+(.*?)\s+>>"', r"\1", text) + "\n"


def main() -> int:
    rendered = render(yaml.safe_load(VALUES.read_text()))
    if "--write" in sys.argv[1:]:
        CONF.write_text(rendered)
        print(f"wrote {CONF.relative_to(ROOT)}")
    else:
        sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
