"""Writes its environment (the agent's variables) to OUTDIR/<role>_<rank>.json, then sleeps ARG2 s."""
import json
import os
import sys
import time

keys = [k for k in os.environ if k in (
    "LOCAL_RANK", "RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
    "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS")]
out = sys.argv[1]
name = "%s_%s_%s" % (os.environ["ROLE_NAME"], os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"])
tmp = os.path.join(out, name + ".tmp")
with open(tmp, "w") as f:
    json.dump({k: os.environ[k] for k in keys}, f)
os.replace(tmp, os.path.join(out, name + ".json"))
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
