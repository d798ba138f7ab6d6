#!/usr/bin/env python3
"""torch worker (torch venv): init_process_group with the given init method, then all_reduce a
one-hot of the rank; the sum must be the world size."""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init-method", "--init_method", required=True)
    parser.add_argument("--world-size", "--world_size", type=int, default=os.getenv("WORLD_SIZE", -1))
    parser.add_argument("--rank", type=int, default=os.getenv("RANK", -1))
    args = parser.parse_args()
    dist.init_process_group(backend="gloo", init_method=args.init_method, world_size=args.world_size,
                            rank=args.rank)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    t = F.one_hot(torch.tensor(rank), num_classes=world_size)
    dist.all_reduce(t)
    derived = torch.sum(t).item()
    if derived != world_size:
        raise RuntimeError("Wrong world size derived. Expected: %d, Got: %d" % (world_size, derived))
    print("Done")


if __name__ == "__main__":
    main()
