#!/usr/bin/env python3
"""torch worker (torch venv): writes torch.distributed.is_torchelastic_launched() to --out-file."""
import argparse

import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_file", "--out-file")
    args = parser.parse_args()
    with open(args.out_file, "w") as out:
        out.write(str(dist.is_torchelastic_launched()))


if __name__ == "__main__":
    main()
