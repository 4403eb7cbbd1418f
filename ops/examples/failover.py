#!/usr/bin/env python3
"""Demo: fail a deployment over from its primary to its standby, simulated.

The deployment has two copies, <deployment>-a and <deployment>-b; which one is primary is
kept in a file next to this script. With RCT_MODE=plan it only describes the change (one
::change line each, the summary last) and changes nothing.
"""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--namespace", required=True)
parser.add_argument("deployment")
args = parser.parse_args()
planning = os.environ.get("RCT_MODE") == "plan"

state = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     f".primary-{args.namespace}-{args.deployment}")
try:
    with open(state) as f:
        primary = f.read().strip()
except FileNotFoundError:
    primary = f"{args.deployment}-a"
standby = (f"{args.deployment}-b" if primary.endswith("-a") else f"{args.deployment}-a")
name = f"{args.namespace}/{args.deployment}"

if planning:
    print(f"::change promote {standby} replica → primary", flush=True)
    print(f"::change demote {primary} primary → replica", flush=True)
    print(f"::change repoint {name} service from {primary} to {standby}", flush=True)
    print(f"fail {name} over from {primary} to {standby}")
else:
    print(f"failing {name} over from {primary} to {standby}", flush=True)
    time.sleep(0.2)
    print(f"::progress 50 {standby} promoted", flush=True)
    with open(state, "w") as f:
        f.write(standby)
    time.sleep(0.2)
    print("::progress 100 service repointed", flush=True)
    print(f"{name}: {standby} is primary")
