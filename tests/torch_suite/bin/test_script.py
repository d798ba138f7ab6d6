#!/usr/bin/env python3
"""Worker for the ported launcher cases (torch's test/distributed/launcher/bin/test_script.py):
prints the agent's environment (every variable must exist) and touches <dir>/<RANK>, or fails."""
import argparse
import os

_ENV = ("LOCAL_RANK", "RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
        "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS", "TEST_SENTINEL_PARENT",
        "TORCHELASTIC_ERROR_FILE")


def main():
    parser = argparse.ArgumentParser(description="launcher test worker")
    parser.add_argument("--fail", action="store_true", help="raise RuntimeError instead of touching")
    parser.add_argument("--touch_file_dir", "--touch-file-dir", help="dir for a file named by RANK")
    args = parser.parse_args()
    print("Distributed env vars set by agent:")
    for name in _ENV:
        print("%s = %s" % (name, os.environ[name]))
    if args.fail:
        raise RuntimeError("raising exception since --fail flag was set")
    path = os.path.join(args.touch_file_dir, os.environ["RANK"])
    open(path, "a").close()
    print("Success, created %s" % path)


if __name__ == "__main__":
    main()
