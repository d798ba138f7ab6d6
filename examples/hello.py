"""A trivial worker: each rank says who it is, then they all meet at a barrier on the job's store."""
import os
import socket

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print("hello from rank %d of %d (local rank %s) on %s, master %s:%s" % (
    rank, world, os.environ["LOCAL_RANK"], socket.gethostname(),
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]), flush=True)
