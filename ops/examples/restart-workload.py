#!/usr/bin/env python3
"""Demo: a rolling restart of a deployment, simulated. Prints progress for rct."""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--namespace", required=True)
parser.add_argument("--strategy", default="rolling")
parser.add_argument("deployment")
args = parser.parse_args()
dry_run = os.environ.get("RCT_DRY_RUN") == "1"

pods = 3
print(f"restarting {args.namespace}/{args.deployment} ({args.strategy}){' [dry run]' if dry_run else ''}", flush=True)
for i in range(1, pods + 1):
    time.sleep(0.3)
    print(f"::progress {i * 100 // pods} pod {i}/{pods} ready", flush=True)
print(f"{args.namespace}/{args.deployment}: {pods} pods restarted")
