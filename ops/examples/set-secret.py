#!/usr/bin/env python3
"""Demo: replace one key of a secret, simulated. The value arrives in SECRET_VALUE."""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--namespace", required=True)
parser.add_argument("--name", required=True)
parser.add_argument("--key", required=True)
args = parser.parse_args()
value = os.environ.get("SECRET_VALUE")
if not value:
    print("no value given", file=sys.stderr)
    sys.exit(2)
print(f"{args.namespace}/{args.name}: key {args.key} set ({len(value)} characters)")
