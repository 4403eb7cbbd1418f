#!/usr/bin/env python3
"""Receives a secret in SECRET_VALUE and in the file named by SECRET_FILE, records what it got
(in the file given as the last argument, outside rct), then prints the value every way a
careless script might: stdout, stderr, progress, base64, the summary (its last stdout line),
and, in mode `fail`, its failure message."""
import base64
import json
import os
import stat
import sys

mode, record = sys.argv[-2], sys.argv[-1]
value = os.environ.get("SECRET_VALUE", "")
path = os.environ.get("SECRET_FILE", "")
with open(path) as f:
    from_file = f.read()
with open(record, "w") as f:
    json.dump(
        {
            "env": value,
            "file": from_file,
            "path": path,
            "file_mode": stat.S_IMODE(os.stat(path).st_mode),
            "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode),
            "argv": sys.argv,
        },
        f,
    )
print(f"::progress 50 using {value}")
print(f"clear {value}")
print("base64 " + base64.b64encode(value.encode()).decode())
print(f"stderr {value}", file=sys.stderr, flush=True)
if mode == "fail":
    print(f"failed using {value}", file=sys.stderr)
    sys.exit(3)
print(f"done with {value}")
