"""Writes its environment (the agent's variables, plus PID) to OUTDIR/<role>_<rank>_<restart>_<world>.json.
Optional second argument: seconds to sleep afterwards, or `hold>N` / `hold<N` to sleep for good while WORLD_SIZE > N / < N."""
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
env = {k: os.environ[k] for k in keys}
env["PID"] = os.getpid()
name = "%s_%s_%s_%s" % (os.environ["ROLE_NAME"], os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"],
                        os.environ["WORLD_SIZE"])
tmp = os.path.join(out, name + ".tmp")
with open(tmp, "w") as f:
    json.dump(env, f)
os.replace(tmp, os.path.join(out, name + ".json"))
# ENVDUMP_AFTER in the launcher's environment stands for the second argument: nodes of one job
# must give the same arguments (the rendezvous refuses a node whose script line differs)
arg = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("ENVDUMP_AFTER")
if arg:
    if arg.startswith("hold>"):
        while int(os.environ["WORLD_SIZE"]) > int(arg[5:]):
            time.sleep(1000)
    elif arg.startswith("hold<"):
        while int(os.environ["WORLD_SIZE"]) < int(arg[5:]):
            time.sleep(1000)
    else:
        time.sleep(float(arg))
