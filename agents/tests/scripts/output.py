#!/usr/bin/env python3
"""Output that has wedged, stalled or lost commands before: `output.py <mode> <arg>`.

huge N      N bytes on stdout with no newline, then exit 0
wide N      one line of N bytes, then "done"
daemon F    leave `sleep 90` running with our stdout and stderr, record its pid in F, exit 0
binary      a non-UTF-8 byte mid-line, then more than a pipe's worth of lines, then a summary
chatty N    N short lines
flood N     short lines, N bytes in all
line N      one line of N bytes (with its newline)
"""
import os
import subprocess
import sys

mode, arg = sys.argv[-2], sys.argv[-1]
out = sys.stdout.buffer

if mode == "huge":
    out.write(b"x" * int(arg))
elif mode == "wide":
    out.write(b"w" * int(arg) + b"\n")
    out.write(b"done\n")
elif mode == "daemon":
    # Inherits our stdout and stderr, so the pipes stay open after we exit.
    child = subprocess.Popen(["sleep", "90"])
    with open(arg, "a") as f:
        f.write(f"{os.environ.get('RCT_COMMAND_ID')} {child.pid}\n")
    out.write(b"daemon started\n")
elif mode == "binary":
    out.write(b"before\n")
    out.write(b"bad \xff byte\n")
    # More than a pipe buffer (64 KiB): a reader that stopped would block us here.
    for i in range(2000):
        out.write(b"after %04d " % i + b"." * 90 + b"\n")
    out.write(b"the last line\n")
elif mode == "chatty":
    out.write(b"".join(b"line %d\n" % i for i in range(int(arg))))
elif mode == "flood":
    chunk = b"".join(b"flood %09d\n" % i for i in range(65536))
    left = int(arg)
    while left > 0:
        piece = chunk[:left]
        out.write(piece)
        left -= len(piece)
    out.write(b"\nflood done\n")
elif mode == "line":
    block = b"y" * (1 << 20)
    left = int(arg)
    while left > 0:
        piece = block[:left]
        out.write(piece)
        left -= len(piece)
    out.write(b"\n")
else:
    sys.exit(f"unknown mode {mode}")
out.flush()
