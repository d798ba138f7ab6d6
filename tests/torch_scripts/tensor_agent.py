"""An API job (LocalElasticAgent in this torch interpreter) whose function workers return tensors.

Usage: tensor_agent.py ROOT OUT_JSON [NPROC] [START_METHOD]. Writes {rank: list or repr} to OUT_JSON.
"""
import json
import os
import sys

import torch


def tensor_of_rank(n):
    # big enough that torch shares its storage (shared memory + fd passing), not inline bytes
    return torch.full((n,), float(os.environ["RANK"]))


def main():
    root, out = sys.argv[1], sys.argv[2]
    nproc = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    method = sys.argv[4] if len(sys.argv) > 4 else "spawn"
    sys.path.insert(0, root)
    import elastic
    spec = elastic.WorkerSpec("trainer", nproc, tensor_of_rank, args=(1000,), max_restarts=0)
    result = elastic.LocalElasticAgent(spec, start_method=method).run()
    values = {}
    for rank, v in result.return_values.items():
        values[rank] = [float(v.min()), float(v.max()), v.numel()] if isinstance(v, torch.Tensor) else repr(v)
    with open(out, "w") as f:
        json.dump({"state": result.state, "values": values,
                   "failures": {r: f.message for r, f in result.failures.items()}}, f)


if __name__ == "__main__":
    main()
