#!/usr/bin/env python3
"""Starts a child that ignores SIGTERM, records both pids and an execution, then waits."""
import os
import signal
import subprocess
import sys
import time

record = sys.argv[-1]
child = subprocess.Popen(
    [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
)
with open(record, "a") as f:
    f.write(f"{os.environ.get('RCT_COMMAND_ID')} {os.getpid()} {child.pid}\n")
print("::progress 10 lingering", flush=True)
time.sleep(600)
