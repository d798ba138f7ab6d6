"""Writes what makes a Python process what it is: its command line as ps shows it, sys.flags,
sys.argv, sys.path, and whether the launcher's bootstrap leaked into its environment.
Usage: identity.py OUT_DIR [ARGS...] (one file per rank, or "plain" without RANK)."""
import json
import os
import sys

with open("/proc/self/cmdline", "rb") as f:
    cmdline = [a.decode() for a in f.read().split(b"\0")[:-1]]
out = os.path.join(sys.argv[1], "identity.%s.json" % os.environ.get("RANK", "plain"))
with open(out + ".tmp", "w") as f:
    json.dump({"cmdline": cmdline, "flags": list(sys.flags), "argv": sys.argv, "path": sys.path,
               "boot_in_env": any(k.startswith("ELASTICRUN_BOOT") for k in os.environ),
               "loader": type(globals().get("__loader__")).__name__}, f)
os.rename(out + ".tmp", out)
