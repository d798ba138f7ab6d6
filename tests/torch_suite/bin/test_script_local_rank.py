#!/usr/bin/env python3
"""Worker for torch.distributed.launch's cases: --local-rank (or --local_rank) must be passed and
equal LOCAL_RANK."""
import argparse
import os


def main():
    print("Start execution")
    parser = argparse.ArgumentParser()
    parser.add_argument("--local-rank", "--local_rank", type=int, required=True)
    args = parser.parse_args()
    expected = int(os.environ["LOCAL_RANK"])
    if expected != args.local_rank:
        raise RuntimeError("--local_rank is %d but LOCAL_RANK is %d" % (args.local_rank, expected))
    print("End execution")


if __name__ == "__main__":
    main()
