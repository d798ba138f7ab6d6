"""A worker that fails under torch's own @record, which writes the torchelastic error file.

    <launcher> record_fail.py [--fail-rank R]

Rank R (default: every rank) raises; the others exit 0 after a short wait for the failing rank.
"""
import argparse
import os

from torch.distributed.elastic.multiprocessing.errors import record


def explode(rank):
    raise ValueError("torch-record worker %d gave up on purpose" % rank)


@record
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    if args.fail_rank is None or args.fail_rank == rank:
        explode(rank)


if __name__ == "__main__":
    main()
