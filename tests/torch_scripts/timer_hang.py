"""A worker watched by torch's own FileTimerClient: it hangs inside an expires() scope.

    <launcher> timer_hang.py --out DIR [--hang-rank R] [--after SECONDS]

Every rank enters `expires(after=...)` on the pipe named by TORCHELASTIC_TIMER_FILE; rank R (0 by
default) then hangs past its deadline and must be killed by the timer server; the other ranks leave
the scope in time and exit 0. Each rank writes DIR/rank<R>.<state> files as it goes, so a test can
see how far it got.
"""
import argparse
import os
import time

from torch.distributed.elastic.timer import FileTimerClient, configure, expires


def mark(out, rank, state):
    with open(os.path.join(out, "rank%d.%s" % (rank, state)), "w") as f:
        f.write(str(os.getpid()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hang-rank", type=int, default=0)
    parser.add_argument("--after", type=float, default=1.0)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    configure(FileTimerClient(file_path=os.environ["TORCHELASTIC_TIMER_FILE"]))
    with expires(after=args.after, scope="step"):
        mark(args.out, rank, "entered")
        if rank == args.hang_rank:
            time.sleep(120)  # hang: only the timer server's signal ends this
            mark(args.out, rank, "woke")
    mark(args.out, rank, "done")


if __name__ == "__main__":
    main()
