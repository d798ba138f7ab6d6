#!/usr/bin/env python3
"""One rendezvous node as a real process, driven line by line for tests/test_rendezvous.py.

    python3 rdzv_node.py BACKEND ENDPOINT RUN_ID MIN MAX LOCAL_ADDR [key=value ...]

Prints one JSON object per line: first {"event": "ready", ...}, then one answer per command read from
stdin: next (join a round), broken (block until round_broken()), isbroken (round_broken() now), waiting (num_nodes_waiting()),
until_waiting (block until num_nodes_waiting() > 0), close, closed, finished, shutdown, exit.
A rendezvous error answers {"event": "error", "type": ..., "message": ...}.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rendezvous  # noqa: E402

_POLL = 0.05   # what an agent's monitor loop does: poll the handler's cheap local checks


def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(argv):
    backend, endpoint, run_id, min_nodes, max_nodes, local_addr = argv[:6]
    conf = dict(item.split("=", 1) for item in argv[6:])
    params = rendezvous.RendezvousParameters(backend, endpoint, run_id, int(min_nodes), int(max_nodes),
                                             local_addr=local_addr, **conf)
    try:
        handler = rendezvous.get_rendezvous_handler(params)
    except rendezvous.RendezvousError as e:
        emit(event="error", type=type(e).__name__, message=str(e))
        return 1
    handler.host_name = os.environ.get("RDZV_NODE_HOST", handler.host_name)   # how others name us
    emit(event="ready", pid=os.getpid(), hosts=handler.hosts_store, port=getattr(handler.store, "port", None),
         id=handler.node_id)
    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "next":
                info = handler.next_rendezvous()
                emit(event="round", rank=info.rank, world_size=info.world_size, round=info.round,
                     master_addr=info.master_addr, master_port=info.master_port, id=handler.node_id)
                info.store.set("rank%d" % info.rank, handler.node_id)   # the round's store works
            elif command == "broken":
                while not handler.round_broken():
                    time.sleep(_POLL)
                emit(event="broken")
            elif command == "isbroken":
                emit(event="isbroken", value=handler.round_broken())
            elif command == "waiting":
                emit(event="waiting", n=handler.num_nodes_waiting())
            elif command == "until_waiting":
                while handler.num_nodes_waiting() == 0:
                    time.sleep(_POLL)
                emit(event="waiting", n=handler.num_nodes_waiting())
            elif command == "close":
                handler.set_closed()
                emit(event="closed")
            elif command == "closed":
                emit(event="is_closed", value=handler.is_closed())
            elif command == "finished":
                handler.finished()
                emit(event="finished")
            elif command == "shutdown":
                handler.shutdown()
                emit(event="shutdown")
            elif command == "exit":
                break
            else:
                emit(event="error", type="Usage", message="unknown command %r" % command)
        except rendezvous.RendezvousError as e:
            emit(event="error", type=type(e).__name__, message=str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
