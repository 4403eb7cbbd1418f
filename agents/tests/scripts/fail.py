#!/usr/bin/env python3
"""Writes to stderr and exits with status 3."""
import sys

print("working", flush=True)
print("the load balancer said no", file=sys.stderr)
sys.exit(3)
