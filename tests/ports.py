"""Ports for tests that must name an endpoint before anything listens on it (etcd members, a c10d
endpoint shared by several agents, torch's MASTER_PORT).

Binding port 0 and releasing it is racy: the kernel hands out that same ephemeral range to every
later bind(0) and to the source port of every outgoing connection, so the port can be taken before
the test's server binds it. These ports come from below the ephemeral range, where only another
explicit choice can collide, and each is checked free by binding it.
"""
import random
import socket

_given = set()


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host="127.0.0.1"):
    """A port that is free now, outside the kernel's ephemeral range, and not given out before."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(200):
            port = random.randrange(10000, low)
            if port not in _given and _bindable(host, port):
                _given.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # an unusual range: the old way
        sock.bind((host, 0))
        return sock.getsockname()[1]
