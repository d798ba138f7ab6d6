"""Rank FAIL_RANK (default 0) raises (no @record: the launcher's bootstrap must capture it)."""
import os
import sys


def compute():
    raise ValueError("bad value on rank %s" % os.environ["RANK"])


if os.environ["RANK"] == os.environ.get("FAIL_RANK", "0"):
    if len(sys.argv) > 1 and sys.argv[1] == "exit":
        sys.exit(int(sys.argv[2]))
    compute()
