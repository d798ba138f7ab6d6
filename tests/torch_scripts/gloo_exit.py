"""A gloo job that ends without a barrier or destroy_process_group: the ranks leave as soon as their
own last collective is done (what many training scripts do). Usage: gloo_exit.py [STEPS]"""
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="env://")
t = torch.ones(1000)
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    dist.all_reduce(t)
print("rank %d done: %s" % (dist.get_rank(), float(t[0])))
