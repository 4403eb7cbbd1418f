#!/usr/bin/env python3
"""Demo: set the replica count of a deployment, simulated."""
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

print(f"scaling {args.namespace}/{args.deployment} to {args.replicas}{' [dry run]' if dry_run else ''}", flush=True)
if args.replicas > 40:
    print(f"quota exceeded: namespace {args.namespace} allows 40 replicas", file=sys.stderr)
    sys.exit(4)
time.sleep(0.3)
print("::progress 100 scaled", flush=True)
print(f"{args.namespace}/{args.deployment}: {args.replicas} replicas")
