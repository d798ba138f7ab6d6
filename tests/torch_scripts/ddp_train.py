"""An ordinary DDP training script: nothing in it knows which launcher started it.

    <launcher> ddp_train.py --out DIR [--steps N] [--ckpt FILE] [--die-at STEP --die-rank R --marker FILE]
                            [--hold-below-world N]

gloo, init_process_group(init_method="env://"), a tiny model trained with DistributedDataParallel on
data that depends only on (step, rank), so a run is bit-for-bit reproducible. Each rank writes
DIR/rank<R>.json: world size, restart count, the all-reduced loss per step, the final parameters
and an all_reduce check (sum of ranks).

--ckpt: rank 0 saves model+optimizer+step after every step (written to a temp file, then renamed);
every rank resumes from it on start. --die-at: rank R SIGKILLs itself at the start of that step,
once (the marker file remembers it already did). --hold-below-world N: when the world is smaller
than N, park after the all_reduce check (as a long job would keep training) until the launcher
restarts the group at the larger size.
"""
import argparse
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ckpt")
    parser.add_argument("--die-at", type=int)
    parser.add_argument("--die-rank", type=int, default=1)
    parser.add_argument("--marker")
    parser.add_argument("--hold-below-world", type=int, default=0)
    parser.add_argument("--hold-timeout", type=float, default=120.0)
    return parser.parse_args()


def batch(step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 6, generator=gen)
    y = x.sum(dim=1, keepdim=True) * 0.5
    return x, y


def save_checkpoint(path, model, opt, step):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = 0
    if args.ckpt and os.path.exists(args.ckpt):
        state = torch.load(args.ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"] + 1
    ddp = DistributedDataParallel(model)

    losses = {}
    for step in range(start, args.steps):
        if args.die_at == step and rank == args.die_rank and not os.path.exists(args.marker):
            with open(args.marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(step, rank)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses[step] = (mean / world).item()
        if args.ckpt and rank == 0:
            save_checkpoint(args.ckpt, model, opt, step)

    check = torch.tensor([float(rank)])
    dist.all_reduce(check)
    result = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "start_step": start,
        "losses": losses,
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
        "rank_sum": check.item(),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "w%d.rank%d.json" % (world, rank))
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    if world < args.hold_below_world:
        # A long job keeps training at this size; the launcher stops this group when it grows.
        time.sleep(args.hold_timeout)
        raise SystemExit("world never grew to %d" % args.hold_below_world)
    dist.destroy_process_group()
    # torch 2.13 sometimes aborts while the interpreter exits, after the script is done ("terminate
    # called without an active exception", no Python frame on any thread: seen in CI, about 1 run
    # in 30, always on a non-zero rank). That is torch's own teardown, not the launcher under test,
    # so leave without it: everything above is written and the process group is destroyed.
    os._exit(0)


if __name__ == "__main__":
    main()
