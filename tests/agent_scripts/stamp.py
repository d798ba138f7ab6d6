"""Bench/test helper: prints the wall time it started; rank 0 fails on attempt 0 when asked."""
import os
import sys
import time

print("start %.6f %s %s" % (time.time(), os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]), flush=True)
mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode == "fail-once" and os.environ["RANK"] == "0" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    print("fail %.6f" % time.time(), flush=True)
    sys.exit(1)
if mode == "fail" and os.environ["RANK"] == "0":
    print("fail %.6f" % time.time(), flush=True)
    sys.exit(1)
if mode == "fail":
    time.sleep(60)
