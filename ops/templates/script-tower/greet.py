#!/usr/bin/env python3
"""Template script: argv in, progress and log lines out, exit status 0 for success."""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--greeting", default="hello")
parser.add_argument("name")
args = parser.parse_args()

if os.environ.get("RCT_DRY_RUN") == "1":
    print(f"would say {args.greeting} to {args.name}")
    raise SystemExit(0)
for step in range(1, 4):
    time.sleep(0.2)
    print(f"::progress {step * 33} step {step}", flush=True)
print(f"{args.greeting}, {args.name}")   # the last line is the outcome's summary
