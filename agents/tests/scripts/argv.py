#!/usr/bin/env python3
"""Prints each argv item as a JSON string on its own line, then its environment's names."""
import json
import os
import sys

for arg in sys.argv[1:]:
    print("arg " + json.dumps(arg))
print("env " + json.dumps(sorted(os.environ)))
print("::progress 50 half way")
print("done with " + str(len(sys.argv) - 1) + " arguments")
