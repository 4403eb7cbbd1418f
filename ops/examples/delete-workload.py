#!/usr/bin/env python3
"""Demo: delete a deployment, simulated."""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--namespace", required=True)
parser.add_argument("deployment")
args = parser.parse_args()
dry_run = os.environ.get("RCT_DRY_RUN") == "1"

print(f"deleting {args.namespace}/{args.deployment}{' [dry run]' if dry_run else ''}", flush=True)
time.sleep(0.2)
print("::progress 50 pods gone", flush=True)
time.sleep(0.2)
print("::progress 100 deleted", flush=True)
print(f"{args.namespace}/{args.deployment}: deleted")
