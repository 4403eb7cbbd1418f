#!/usr/bin/env python3
"""Demo: set the replica count of a deployment, simulated.

The count is kept in a file next to this script (.state/), 3 until first set. The count it
had before is the output previous_replicas: the catalog's inverse sets it back (rct undo).
"""
import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--namespace", required=True)
parser.add_argument("--replicas", type=int, required=True)
parser.add_argument("deployment")
args = parser.parse_args()
dry_run = os.environ.get("RCT_DRY_RUN") == "1"

state_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".state")
state = os.path.join(state_dir, f"replicas.{args.namespace}.{args.deployment}")
try:
    with open(state) as f:
        previous = int(f.read())
except (OSError, ValueError):
    previous = 3

print(f"scaling {args.namespace}/{args.deployment} from {previous} to {args.replicas}{' [dry run]' if dry_run else ''}", flush=True)
if args.replicas > 40:
    print(f"quota exceeded: namespace {args.namespace} allows 40 replicas", file=sys.stderr)
    sys.exit(4)
time.sleep(0.3)
if not dry_run:
    os.makedirs(state_dir, exist_ok=True)
    with open(state, "w") as f:
        f.write(str(args.replicas))
print("::progress 100 scaled", flush=True)
print(f"::output previous_replicas {previous}", flush=True)
print(f"{args.namespace}/{args.deployment}: {args.replicas} replicas (were {previous})")
