#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Barrier rendezvous over the store: nodes meet in numbered rounds and leave with a rank.

Standard library plus ``store.py``; copy the two files anywhere. It is the middle layer of elasticrun
(``store`` <- ``rendezvous`` <- ``elastic``) and plays the part of torch's ``DynamicRendezvousHandler``.

Usage::

    from rendezvous import RendezvousParameters, get_rendezvous_handler
    params = RendezvousParameters("c10d", "10.0.0.1:29400", "job42", min_nodes=2, max_nodes=4,
                                  local_addr="10.0.0.7", last_call_timeout=5)
    handler = get_rendezvous_handler(params)
    info = handler.next_rendezvous()       # blocks until this node is in a completed round
    info.rank, info.world_size, info.master_addr, info.master_port, info.round
    info.store                             # a PrefixStore private to this run and round
    handler.round_broken()                 # poll: a member died or left -> call next_rendezvous() again
    handler.num_nodes_waiting()            # poll: > 0 -> nodes wait to join, restart at the new size
    handler.set_closed()                   # end the run for every node
    handler.shutdown()                     # leave (the others see the round as broken)

Backends. ``c10d`` (alias ``store``): endpoint ``host[:port]`` (default port 29400, ``[v6addr]:port``
for IPv6). The node whose address matches the host, or that has ``is_host=1``, serves the store in
its own process; with no explicit ``is_host`` a node that cannot bind the port (someone else on this
machine already serves it) becomes a client. Clients connect with jittered backoff until
``join_timeout``. ``static``: endpoint ``master_addr:master_port`` (default 29500), conf ``rank``; node
rank 0 serves the store, ranks are the given node ranks, ``min_nodes == max_nodes``. ``etcd`` runs the
same algorithm on a store object that speaks etcd. ``RendezvousHandler(store, params)`` runs it over
any object with the store API (``set get add compare_set wait check multi_get``).

Configuration (``--rdzv-conf``; every value checked, a bad one raises a one-line ``ValueError``):
``join_timeout`` 600, ``last_call_timeout`` 30, ``close_timeout`` 30, ``heartbeat_interval`` 5,
``heartbeat_timeout`` 15, ``read_timeout`` 60 (seconds), ``is_host`` (bool), ``token_file`` (shared
secret for the store), ``rank`` (static only). ``close_timeout`` is accepted for torchrun compatibility
and checked, but nothing waits on it: closing here is a single store write.

The algorithm: one round is an atomic counter plus one wake-up key. Every joiner does one ``add`` on
the round's counter; the value returned is its slot (1, 2, 3, ...). It writes its record (id, address,
a free port) under that slot and then blocks on the round's ``done`` key with one parked ``get``::

    node    add(arrive,1)  set(node/slot)        wait(done) ........................ get(done) -> rank
    slot 1 ----[1]------------[rec]---------------------------------------------------+
    slot 2 ----[2]------------[rec]  <- the closer: slot == min_nodes                  |
                                     wait(gate)   previous round released? (r > 0)     |
                                     wait(full, last_call_timeout)  slot max sets full |
                                     add(arrive, FREEZE) -> exact member count, atomic |
                                     multi_get(node/1..n), sort, compare_set(done) ----+
    slot 3 ----[3]------------[rec]  (arrived during the last call: a member)
    late   ----[FREEZE+4]  -> round closed: join the next round and wait there

Exactly one node (the one whose ``add`` returned ``min_nodes``) closes a round, so there is no
compare-and-set loop: per round each node does about six store operations and the closer one
``multi_get``, O(nodes) in all. The ``FREEZE`` add both counts the members exactly and turns every
later ``add`` into a "too late" answer, with no lock. ``done`` is written with ``compare_set`` so that
``set_closed()`` can race the closer and exactly one outcome wins. Ranks: members sorted by (address,
node id) (static: by node rank), so a node keeps its rank across rounds when membership allows; when
more than ``max_nodes`` arrived, members of the previous round are kept first.

The closer beats the round's ``closer_hb`` counter every ``heartbeat_interval`` while it waits, and the
waiting nodes peek at it once per interval. When it stays unchanged for ``heartbeat_timeout`` (the
closer died in the last call), the first waiter to ``compare_set`` the ``closer`` key to its own id
takes over: it leaves the dead closer out and closes at once. A round frozen by a closer that died
before writing ``done`` is finished from ``frozen`` and the records that exist.

Rounds follow each other. A node that arrives while a round runs waits in the next round; that round's
closer first waits for its ``gate``, which a member of the running round opens when it comes back
(failure restart, scale-up restart, a dead member, a member leaving). While it waits, the closer also
reads the running round's heartbeat counters (one ``multi_get`` per interval): if none moved for
``heartbeat_timeout``, every member is gone and it opens the round itself. Members see the waiting node
through ``num_nodes_waiting()`` (one ``add(..., 0)`` on the next round's counter; when the running
round is already at ``max_nodes`` only returning members count, so a node that cannot fit does not
cause restarts). Returning members are counted in the counter's high bits (``REJOIN``).

Liveness, O(nodes) store work per interval in total: each member ``add``\\s 1 to its own heartbeat
counter every ``heartbeat_interval``, reads the counter of ONE neighbour (rank + 1, in a ring) and the
round's ``broken`` counter: three operations per member per interval. The observer measures silence
with its own ``time.monotonic()``: a counter unchanged for ``heartbeat_timeout`` means that neighbour
is dead, and the observer marks the round broken. Every dead member has a live predecessor in the ring
unless all are dead, so one death is always seen. ``round_broken()`` reads a local flag (free to poll).
A store whose object has ``set_ephemeral`` (etcd leases) gets heartbeat keys that vanish with their
writer; a vanished key counts as dead at once. Losing the store connection marks the round broken and
the next call raises ``RendezvousConnectionError`` instead of hanging.

Key layout (``R`` = the run id, percent-quoted so run ids never overlap; ``r`` = round number)::

    elastic/R/closed            "1" once set_closed()
    elastic/R/open              hint: the lowest round that may still take joiners
    elastic/R/r/arrive          joins + REJOIN * returning members (+ FREEZE once closed)
    elastic/R/r/node/<slot>     JSON record of the node in that slot
    elastic/R/r/gate            the previous round has ended (or there was none)
    elastic/R/r/full            slot max_nodes has arrived: close without waiting out the last call
    elastic/R/r/closer          id of the node closing the round (changed only by a takeover)
    elastic/R/r/closer_hb       the closer's heartbeat counter while it waits
    elastic/R/r/frozen          the member count the FREEZE add returned
    elastic/R/r/done            outcome: JSON members and master address, or "closed", or "retry"
    elastic/R/r/hb/<rank>       heartbeat counter of the member with that rank
    elastic/R/r/broken          > 0 once a member died or left; reason in broken_why
    elastic/R/r/user/...        RendezvousInfo.store: the agents' own keys for this round

Errors: ``RendezvousError`` is the root; ``RendezvousTimeoutError`` (also ``TimeoutError``) says how
many nodes joined of how many needed; ``RendezvousClosedError``; ``RendezvousConnectionError`` (also
``ConnectionError``) when the store cannot be reached or went away.
"""

__version__ = "0.1.0"
__all__ = [
    "RendezvousParameters", "RendezvousHandler", "RendezvousInfo", "get_rendezvous_handler",
    "RendezvousError", "RendezvousTimeoutError", "RendezvousClosedError", "RendezvousConnectionError",
]

import json
import logging
import os
import random
import socket
import threading
import time
from urllib.parse import quote

try:  # vendored inside a package
    from . import store as _store
except ImportError:  # top-level module
    import store as _store

log = logging.getLogger(__name__)

_SLOT_BITS = 20
_SLOT_MASK = (1 << _SLOT_BITS) - 1          # joins (slots) live in the low bits of arrive
_REJOIN = 1 << _SLOT_BITS                   # returning members, counted in the middle bits
_FREEZE = 1 << 2 * _SLOT_BITS + 2           # added once by the closer: the round is closed

_DEFAULT_C10D_PORT = 29400
_DEFAULT_STATIC_PORT = 29500
_TIMEOUTS = {
    "join_timeout": 600.0, "last_call_timeout": 30.0, "close_timeout": 30.0,
    "heartbeat_interval": 5.0, "heartbeat_timeout": 15.0, "read_timeout": 60.0,
}
_OTHER_KEYS = ("is_host", "token_file", "rank")
_TORCH_ONLY_KEYS = ("store_type", "use_libuv", "local_addr")   # accepted from torchrun users, unused
_BACKENDS = ("c10d", "store", "static", "etcd")
_CLOSED, _RETRY = "closed", "retry"


class RendezvousError(Exception):
    """Root of this module's errors."""


class RendezvousTimeoutError(RendezvousError, TimeoutError):
    """Not enough nodes joined in time; the message says how many joined of how many needed."""


class RendezvousClosedError(RendezvousError):
    """The run was closed (``set_closed()``); no further rounds will form."""


class RendezvousConnectionError(RendezvousError, ConnectionError):
    """The store could not be reached, or went away."""


# ------------------------------------------------------------------------------------- parameters

def _parse_endpoint(endpoint, default_port):
    """``host``, ``host:port``, ``[v6]:port``, ``[v6]`` or a bare IPv6 address -> (host, port)."""
    text = (endpoint or "").strip()
    if not text:
        return "127.0.0.1", default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("rdzv endpoint %r: missing ']' after the IPv6 address" % endpoint)
        host, rest = text[1:end], text[end + 1:]
        if not rest:
            return host or _bad_endpoint(endpoint), default_port
        if not rest.startswith(":"):
            raise ValueError("rdzv endpoint %r: expected ':PORT' after ']'" % endpoint)
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        return text, default_port             # a bare IPv6 address
    else:
        return text, default_port
    if not host:
        _bad_endpoint(endpoint)
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("rdzv endpoint %r: port %r is not a number" % (endpoint, port_text)) from None
    if not 0 <= port <= 65535:
        raise ValueError("rdzv endpoint %r: port %d is outside 0..65535" % (endpoint, port))
    return host, port


def _bad_endpoint(endpoint):
    raise ValueError("rdzv endpoint %r has no host" % (endpoint,))


def _as_bool(key, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError("rdzv conf %s=%r is not a boolean (use 1/0, true/false)" % (key, value))


def _as_int(key, value, low):
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError("%s=%r is not an integer" % (key, value)) from None
    if isinstance(number, bool) or number < low:
        raise ValueError("%s=%r must be an integer >= %d" % (key, value, low))
    return number


class RendezvousParameters:
    """Validated rendezvous settings: the launcher's ``--rdzv-*`` options.

    ``config`` keeps the ``--rdzv-conf`` values as given; the checked values are attributes
    (``join_timeout``, ``heartbeat_interval``, ``is_host`` (None when not given), ``host``, ``port``...).
    """

    def __init__(self, backend, endpoint, run_id, min_nodes, max_nodes, local_addr=None, **config):
        backend = str(backend or "").strip()
        if backend not in _BACKENDS:
            raise ValueError("rdzv backend %r is unknown; choose one of %s" % (backend, ", ".join(_BACKENDS)))
        if not isinstance(run_id, str) or not run_id:
            raise ValueError("rdzv run_id must be a non-empty string, got %r" % (run_id,))
        self.backend, self.endpoint, self.run_id = backend, endpoint or "", run_id
        self.min_nodes = _as_int("min_nodes", min_nodes, 1)
        self.max_nodes = _as_int("max_nodes", max_nodes, 1)
        if self.max_nodes < self.min_nodes:
            raise ValueError("max_nodes=%d is less than min_nodes=%d" % (self.max_nodes, self.min_nodes))
        if local_addr is not None and (not isinstance(local_addr, str) or not local_addr.strip()):
            raise ValueError("local_addr must be a non-empty string, got %r" % (local_addr,))
        self.local_addr = local_addr.strip() if local_addr else None
        self.config = dict(config)
        for key in self.config:
            if key not in _TIMEOUTS and key not in _OTHER_KEYS and key not in _TORCH_ONLY_KEYS:
                raise ValueError("unknown rdzv conf key %r; known keys: %s"
                                 % (key, ", ".join(sorted(list(_TIMEOUTS) + list(_OTHER_KEYS)))))
        for key, default in _TIMEOUTS.items():
            value = self.config.get(key, default)
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                raise ValueError("rdzv conf %s=%r is not a number of seconds" % (key, value)) from None
            if not seconds > 0 or seconds != seconds or seconds == float("inf"):
                raise ValueError("rdzv conf %s=%r must be a positive number of seconds" % (key, value))
            setattr(self, key, seconds)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("rdzv conf heartbeat_timeout=%g must exceed heartbeat_interval=%g"
                             % (self.heartbeat_timeout, self.heartbeat_interval))
        self.is_host = _as_bool("is_host", self.config["is_host"]) if "is_host" in self.config else None
        token_file = self.config.get("token_file")
        if token_file is not None and (not isinstance(token_file, str) or not token_file):
            raise ValueError("rdzv conf token_file=%r is not a path" % (token_file,))
        if token_file and not os.access(token_file, os.R_OK):
            raise ValueError("rdzv conf token_file=%r cannot be read" % (token_file,))
        self.token_file = token_file or None
        self.rank = None
        if backend == "static":
            if self.min_nodes != self.max_nodes:
                raise ValueError("the static backend needs a fixed node count, got min_nodes=%d max_nodes=%d"
                                 % (self.min_nodes, self.max_nodes))
            if "rank" in self.config:
                self.rank = _as_int("rdzv conf rank", self.config["rank"], 0)
            elif self.max_nodes == 1:
                self.rank = 0
            else:
                raise ValueError("the static backend needs rdzv conf rank (this node's rank)")
            if self.rank >= self.max_nodes:
                raise ValueError("rdzv conf rank=%d must be below the node count %d" % (self.rank, self.max_nodes))
        elif "rank" in self.config:
            raise ValueError("rdzv conf rank is only for the static backend, not %r" % backend)
        if backend == "etcd":
            self.host, self.port = None, None
            self.endpoints = _parse_etcd_endpoints(self.endpoint)
        else:
            default = _DEFAULT_STATIC_PORT if backend == "static" else _DEFAULT_C10D_PORT
            self.host, self.port = _parse_endpoint(self.endpoint, default)

    def get(self, key, default=None):
        """A raw ``--rdzv-conf`` value (torch's API)."""
        return self.config.get(key, default)

    def get_as_bool(self, key, default=None):
        value = self.config.get(key, default)
        return None if value is None else _as_bool(key, value)

    def get_as_int(self, key, default=None):
        value = self.config.get(key, default)
        return None if value is None else _as_int(key, value, -(1 << 62))

    def __repr__(self):
        return ("RendezvousParameters(backend=%r, endpoint=%r, run_id=%r, min_nodes=%d, max_nodes=%d, "
                "local_addr=%r, config=%r)" % (self.backend, self.endpoint, self.run_id, self.min_nodes,
                                                self.max_nodes, self.local_addr, self.config))


def _parse_etcd_endpoints(endpoint):
    urls = [part.strip() for part in (endpoint or "").split(",") if part.strip()]
    if not urls:
        raise ValueError("the etcd backend needs an endpoint: http://host:port[,http://host:port...]")
    result = []
    for url in urls:
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "http", url
        if scheme not in ("http", "https"):
            raise ValueError("etcd endpoint %r: scheme must be http or https" % url)
        host, port = _parse_endpoint(rest.rstrip("/"), 2379)
        result.append("%s://%s:%d" % (scheme, "[%s]" % host if ":" in host else host, port))
    return result


# ------------------------------------------------------------------------------------- results

class RendezvousInfo:
    """What a completed round gives this node."""

    __slots__ = ("store", "rank", "world_size", "master_addr", "master_port", "round", "members")

    def __init__(self, store, rank, world_size, master_addr, master_port, round, members=()):
        self.store = store                  # PrefixStore private to this run and round
        self.rank = rank                    # this node's group rank, 0..world_size-1
        self.world_size = world_size
        self.master_addr = master_addr      # rank-0 node's address
        self.master_port = master_port      # a free port on the rank-0 node, new each round
        self.round = round
        self.members = list(members)        # (address, node id) by rank

    def __repr__(self):
        return ("RendezvousInfo(rank=%d, world_size=%d, master_addr=%r, master_port=%d, round=%d)"
                % (self.rank, self.world_size, self.master_addr, self.master_port, self.round))


class _Keys:
    """Key names of one run (see the key layout in the module docstring)."""

    def __init__(self, run_id):
        self.base = "elastic/" + quote(run_id, safe="")
        self.closed = self.base + "/closed"
        self.open = self.base + "/open"

    def round(self, r, name):
        return "%s/%d/%s" % (self.base, r, name)


def _free_port():
    """A TCP port nobody listens on right now, on every interface of this host."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr, 0))
                return s.getsockname()[1]
        except OSError:
            continue
    raise RendezvousError("cannot find a free TCP port on this host")


def _node_id():
    return "%s-%d-%s" % (socket.gethostname(), os.getpid(), "%06x" % random.getrandbits(24))


# ------------------------------------------------------------------------------------- the handler

class RendezvousHandler:
    """The round algorithm over any object with the store API (see the module docstring).

    ``store``: a ``TCPStore``, an etcd store, anything with ``set get add compare_set wait check
    multi_get``. ``hosts_store``: this node serves that store; ``shutdown()`` then keeps it serving so
    the other nodes can finish, and ``close()`` stops it. ``order``: the sort key of this node (default:
    its address then its id), ``node_id``: a stable id (default: host name, pid and a random part).
    """

    def __init__(self, store, params, *, hosts_store=False, order=None, node_id=None, owns_store=True):
        self._store = store
        self._params = params
        self.hosts_store = hosts_store
        self._owns_store = owns_store
        self._keys = _Keys(params.run_id)
        self.local_addr = params.local_addr or socket.gethostname()
        self.node_id = node_id or _node_id()
        self._order = list(order) if order is not None else [self.local_addr, self.node_id]
        self._ephemeral = callable(getattr(store, "set_ephemeral", None))
        self._round = None              # last completed round this node is a member of
        self._rank = None
        self._world_size = 0
        self._broken = threading.Event()
        self._lost = None               # the StoreConnectionError that ended the store
        self._beat_stop = None
        self._beat_thread = None
        self._closed_seen = False

    @property
    def store(self):
        """The underlying store object (the agents may use it for their own keys)."""
        return self._store

    def get_run_id(self):
        return self._params.run_id

    # -- joining

    def next_rendezvous(self):
        """Join the next round and block until it completes with this node in it."""
        params = self._params
        deadline = time.monotonic() + params.join_timeout
        self._stop_heartbeat()
        with self._mapped_errors():
            if self._closed_seen or self._store.check([self._keys.closed]):
                self._closed_seen = True
                raise RendezvousClosedError("rendezvous of run %r is closed" % params.run_id)
            previous = self._round
            r = self._read_open()
            if previous is not None:
                r = max(r, previous + 1)
            if self._round is not None and not self._broken.is_set():
                self._leave_round("node %s rejoined" % self.node_id)
            self._round, self._rank, self._world_size = None, None, 0
            self._broken.clear()
            while True:
                info = self._try_round(r, deadline, rejoin=previous is not None and r == previous + 1)
                if info is not None:
                    return info
                r += 1

    def _read_open(self):
        return self._store.add(self._keys.open, 0)     # a missing key reads as round 0

    def _try_round(self, r, deadline, rejoin):
        """One attempt at round r: the RendezvousInfo, or None when this node must try round r + 1."""
        store, params, keys = self._store, self._params, self._keys
        if rejoin:
            store.set(keys.round(r, "gate"), "1")      # the round we were in has ended
        value = store.add(keys.round(r, "arrive"), 1 + (_REJOIN if rejoin else 0))
        if value >= _FREEZE:
            log.debug("round %d of run %r closed before we arrived", r, params.run_id)
            return None
        slot = value & _SLOT_MASK
        record = {"id": self.node_id, "addr": self.local_addr, "order": self._order,
                  "port": _free_port(), "rejoin": rejoin}
        store.set(keys.round(r, "node/%d" % slot), json.dumps(record))
        if slot == params.max_nodes:
            store.set(keys.round(r, "full"), "1")
        if slot == params.min_nodes:
            self._close_round(r, deadline)
        outcome = self._await(r, keys.round(r, "done"), deadline, slot, watch_closer=True)
        if outcome == _CLOSED:
            self._closed_seen = True
            raise RendezvousClosedError("rendezvous of run %r is closed" % params.run_id)
        if outcome == _RETRY:
            return None
        if outcome.startswith("error:"):
            raise RendezvousError(outcome[len("error:"):])
        result = json.loads(outcome)
        members = [tuple(m) for m in result["members"]]
        ids = [m[1] for m in members]
        if self.node_id not in ids:
            log.info("round %d of run %r formed without this node (max_nodes=%d); waiting for the next",
                     r, params.run_id, params.max_nodes)
            return None
        rank = ids.index(self.node_id)
        self._round, self._rank, self._world_size = r, rank, len(members)
        self._start_heartbeat(r, rank, len(members))
        prefix = keys.round(r, "user")
        log.info("rendezvous round %d of run %r complete: rank %d of %d, master %s:%d",
                 r, params.run_id, rank, len(members), result["master_addr"], result["master_port"])
        return RendezvousInfo(_store.PrefixStore(prefix, store), rank, len(members),
                              result["master_addr"], result["master_port"], r, members)

    def _await(self, r, key, deadline, slot, watch_closer=False):
        """The value of `key`, waiting until `deadline`; a timeout names the join count.

        `watch_closer`: while waiting, check every heartbeat_interval that round r's closer still
        beats; when it has been silent for heartbeat_timeout, take its place (one node wins).
        """
        store, params, keys = self._store, self._params, self._keys
        seen, changed = None, time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(r, slot)
            try:
                store.wait([key], min(remaining, params.heartbeat_interval) if watch_closer else remaining)
                return store.get(key).decode("utf-8")
            except _store.StoreTimeout:
                if not watch_closer:
                    continue
            value, now = store.add(keys.round(r, "closer_hb"), 0), time.monotonic()
            if value != seen:
                seen, changed = value, now
            elif value == 0 and store.add(keys.round(r, "arrive"), 0) & _SLOT_MASK < params.min_nodes:
                changed = now                  # no closer yet: min_nodes have not arrived
            elif now - changed > params.heartbeat_timeout:
                dead = self._take_over(r, now - changed)
                if dead is not None:
                    self._close_round(r, deadline, dead=dead)
                seen, changed = None, time.monotonic()

    def _take_over(self, r, silence):
        """Claim round r's closing from a silent closer; its id when we won, else None."""
        store, key = self._store, self._keys.round(r, "closer")
        current = store.get(key).decode("utf-8") if store.check([key]) else ""
        if store.compare_set(key, current, self.node_id).decode("utf-8") != self.node_id:
            return None
        log.warning("round %d of run %r: the closer %s was silent for %.1f s; %s closes the round",
                    r, self._params.run_id, current or "(unknown)", silence, self.node_id)
        return current

    def _timeout(self, r, slot):
        """Withdraw from round r (so a later closer skips us) and describe the shortfall."""
        store, params, keys = self._store, self._params, self._keys
        try:
            if slot is not None:
                store.set(keys.round(r, "node/%d" % slot), json.dumps({"withdrawn": self.node_id}))
            joined = store.add(keys.round(r, "arrive"), 0) & _SLOT_MASK
        except _store.StoreError:
            joined = -1
        what = "joined %s of %d needed" % (joined if joined >= 0 else "?", params.min_nodes)
        if joined >= params.min_nodes:
            what += " (waiting for the running round to end)"
        return RendezvousTimeoutError("rendezvous of run %r timed out after %g s: %s"
                                      % (params.run_id, params.join_timeout, what))

    def _close_round(self, r, deadline, dead=None):
        """This node is the round's closer: wait for the gate and the last call, then decide.

        `dead`: we took over from that silent closer; it is left out, and the last call (which
        began before it died and lasted at least heartbeat_timeout since) is not waited again.
        """
        store, params, keys = self._store, self._params, self._keys
        beat = keys.round(r, "closer_hb")
        if dead is None:
            store.set(keys.round(r, "closer"), self.node_id)
        store.add(beat, 1)

        def wait_beating(key, until, all_silent=None):
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                try:
                    store.wait([key], min(left, params.heartbeat_interval))
                    return True
                except _store.StoreTimeout:
                    store.add(beat, 1)
                    if all_silent is not None and all_silent():
                        return True

        if r > 0:
            if not wait_beating(keys.round(r - 1, "done"), deadline):
                raise self._timeout(r, None)
            previous = store.get(keys.round(r - 1, "done"))
            if previous.startswith(b"{"):   # a round ran before this one: wait for it to end
                world = len(json.loads(previous.decode("utf-8"))["members"])
                silent = _Silence([keys.round(r - 1, "hb/%d" % i) for i in range(world)], self._peek_all,
                                  params.heartbeat_timeout)
                if not wait_beating(keys.round(r, "gate"), deadline, silent):
                    raise self._timeout(r, None)
                if silent.fired:
                    log.warning("round %d of run %r: every member of round %d is silent; forming round %d",
                                r, params.run_id, r - 1, r)
        if params.min_nodes < params.max_nodes and dead is None:
            wait_beating(keys.round(r, "full"), min(deadline, time.monotonic() + params.last_call_timeout))
        value = store.add(keys.round(r, "arrive"), _FREEZE)
        frozen = keys.round(r, "frozen")
        if value < 2 * _FREEZE:                       # we froze it: the count is exact
            joined = (value - _FREEZE) & _SLOT_MASK
            store.set(frozen, str(joined))
        else:                                         # a closer before us froze it, then went silent
            joined = int(store.get(frozen)) if store.check([frozen]) else value & _SLOT_MASK
        names = [keys.round(r, "node/%d" % slot) for slot in range(1, joined + 1)]
        if not store.check(names):
            try:   # a joiner is between its add and its record; one that died there is left out
                store.wait(names, params.heartbeat_timeout)
            except _store.StoreTimeout:
                names = [name for name in names if store.check([name])]
        entries = []
        for name, data in zip(names, store.multi_get(names) if names else []):
            record = json.loads(data.decode("utf-8"))
            if "withdrawn" not in record and record["id"] != dead:
                record["slot"] = int(name.rsplit("/", 1)[1])
                entries.append(record)
        chosen = sorted(entries, key=lambda e: (not e["rejoin"], e["slot"]))[:params.max_nodes]
        members = sorted(chosen, key=lambda e: (e["order"], e["id"]))
        orders = [tuple(e["order"]) for e in members]
        if len(members) < params.min_nodes:
            outcome = _RETRY
        elif len(set(orders)) != len(orders) and params.backend == "static":
            outcome = "error:two nodes of run %r claim the same static rank: %s" % (
                params.run_id, sorted(o[0] for o in orders))
        else:
            outcome = json.dumps({"members": [[e["addr"], e["id"]] for e in members],
                                  "master_addr": members[0]["addr"], "master_port": members[0]["port"]})
        store.set(keys.open, str(r + 1))
        store.compare_set(keys.round(r, "done"), "", outcome)

    # -- liveness

    def _start_heartbeat(self, r, rank, world_size):
        stop = threading.Event()
        thread = threading.Thread(target=self._heartbeat, args=(r, rank, world_size, stop),
                                  name="rdzv-heartbeat", daemon=True)
        self._beat_stop, self._beat_thread = stop, thread
        thread.start()

    def _stop_heartbeat(self):
        stop, thread = self._beat_stop, self._beat_thread
        self._beat_stop = self._beat_thread = None
        if stop is not None:
            stop.set()
            if thread is not threading.current_thread():
                thread.join(self._params.read_timeout)

    def _heartbeat(self, r, rank, world_size, stop):
        store, keys, params = self._store, self._keys, self._params
        mine = keys.round(r, "hb/%d" % rank)
        neighbour = (rank + 1) % world_size if world_size > 1 else None
        their = keys.round(r, "hb/%d" % neighbour) if neighbour is not None else None
        broken = keys.round(r, "broken")
        beats, seen, changed = 0, None, time.monotonic()
        # the first beat at a random point of the interval spreads a large round's beats over time
        if stop.wait(random.uniform(0, min(params.heartbeat_interval, params.heartbeat_timeout / 4))):
            return
        while True:
            try:
                beats += 1
                if self._ephemeral:
                    store.set_ephemeral(mine, str(beats))
                else:
                    store.add(mine, 1)
                if their is not None and not self._broken.is_set():
                    value = self._peek(their)
                    now = time.monotonic()
                    if value is None and seen is not None:
                        self._declare_dead(r, neighbour, "its heartbeat key vanished")
                    elif value != seen:
                        seen, changed = value, now
                    elif now - changed > params.heartbeat_timeout:
                        self._declare_dead(r, neighbour, "no heartbeat for %.1f s" % (now - changed))
                if not self._broken.is_set() and store.add(broken, 0) > 0:
                    log.info("round %d of run %r is broken: %s", r, params.run_id, self._why(r))
                    self._broken.set()
            except _store.StoreConnectionError as e:
                self._lost = e
                self._broken.set()
                log.warning("rendezvous store lost: %s", e)
                return
            except _store.StoreError as e:
                log.warning("heartbeat of round %d failed: %s", r, e)
            if stop.wait(params.heartbeat_interval):
                return

    def _peek(self, key):
        if self._ephemeral:
            if not self._store.check([key]):
                return None
            return self._store.get(key)
        return self._store.add(key, 0)

    def _peek_all(self, names):
        """The heartbeat values of `names` (one operation when every key exists)."""
        store = self._store
        if store.check(names):
            return tuple(store.multi_get(names))
        return tuple(self._peek(name) if self._ephemeral or store.check([name]) else None for name in names)

    def _why(self, r):
        try:
            key = self._keys.round(r, "broken_why")
            return self._store.get(key).decode("utf-8") if self._store.check([key]) else "unknown"
        except _store.StoreError:
            return "unknown"

    def _declare_dead(self, r, rank, why):
        log.warning("round %d of run %r: member with rank %d is dead (%s)", r, self._params.run_id, rank, why)
        self._mark_broken(r, "member with rank %d is dead: %s" % (rank, why))

    def _mark_broken(self, r, why):
        store, keys = self._store, self._keys
        store.set(keys.round(r, "broken_why"), why)
        store.add(keys.round(r, "broken"), 1)
        store.set(keys.round(r + 1, "gate"), "1")      # the survivors may form the next round
        self._broken.set()

    def _leave_round(self, why):
        try:
            self._mark_broken(self._round, why)
        except _store.StoreError as e:
            log.debug("could not mark round %s broken: %s", self._round, e)

    def round_broken(self):
        """True once a member of the current round died or left, or the store was lost (no store I/O)."""
        return self._broken.is_set()

    # -- run state

    def num_nodes_waiting(self):
        """Nodes waiting for the next round (that would fit in it): > 0 means restart to let them in."""
        if self._round is None:
            return 0
        with self._mapped_errors():
            value = self._store.add(self._keys.round(self._round + 1, "arrive"), 0)
        joins, rejoins = value & _SLOT_MASK, (value >> _SLOT_BITS) & _SLOT_MASK
        if value >= _FREEZE:            # the next round formed without us: we must rejoin
            return max(joins, 1)
        if self._world_size >= self._params.max_nodes:
            return rejoins
        return joins

    def is_closed(self):
        with self._mapped_errors():
            closed = self._store.check([self._keys.closed])
        self._closed_seen = self._closed_seen or closed
        return closed

    def set_closed(self):
        """Close the run: waiting nodes get RendezvousClosedError, no new round forms."""
        store, keys = self._store, self._keys
        with self._mapped_errors():
            store.set(keys.closed, "1")
            first = self._read_open()
            if self._round is not None:
                first = max(first, self._round + 1)
            for r in (first, first + 1):
                store.compare_set(keys.round(r, "done"), "", _CLOSED)
                store.multi_set([keys.round(r, "gate"), keys.round(r, "full")], ["1", "1"])
        self._closed_seen = True

    def shutdown(self):
        """Leave the run: stop heartbeats and tell the round's other members. Returns True."""
        self._stop_heartbeat()
        if self._round is not None and self._lost is None:
            self._leave_round("node %s left" % self.node_id)
        self._round = None
        if self._owns_store and not self.hosts_store:
            self._close_store()
        return True

    def close(self):
        """shutdown(), then close the store, and stop serving it when this node hosts it."""
        self.shutdown()
        if self._owns_store:
            self._close_store()

    def _close_store(self):
        try:
            self._store.close()
        except Exception as e:  # closing is best effort
            log.debug("closing the store: %s", e)

    def _mapped_errors(self):
        return _MappedErrors(self)


class _Silence:
    """Callable: True once the values read from `names` have not changed for `timeout` seconds."""

    def __init__(self, names, peek, timeout):
        self.names, self.peek, self.timeout = names, peek, timeout
        self.seen, self.changed, self.fired = None, time.monotonic(), False

    def __call__(self):
        values, now = self.peek(self.names), time.monotonic()
        if values != self.seen:
            self.seen, self.changed = values, now
        elif now - self.changed > self.timeout:
            self.fired = True
        return self.fired


class _MappedErrors:
    """Turns store errors into rendezvous errors (a context manager)."""

    def __init__(self, handler):
        self.handler = handler

    def __enter__(self):
        if self.handler._lost is not None:
            raise RendezvousConnectionError("rendezvous store lost: %s" % self.handler._lost)

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, RendezvousError):
            return False
        if isinstance(error, _store.StoreConnectionError):
            self.handler._lost = error
            raise RendezvousConnectionError("rendezvous store lost: %s" % error) from error
        if isinstance(error, _store.StoreTimeout):
            raise RendezvousTimeoutError("rendezvous store did not answer: %s" % error) from error
        if isinstance(error, _store.StoreError):
            raise RendezvousError("rendezvous store error: %s" % error) from error
        return False


# ------------------------------------------------------------------------------------- backends

def _read_token(path):
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError("rdzv conf token_file=%r cannot be read: %s" % (path, e.strerror or e)) from None
    if not token:
        raise ValueError("rdzv conf token_file=%r is empty" % path)
    return token


def _is_local_host(host, local_addr):
    """Whether `host` names this machine, without any name lookup."""
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", socket.gethostname()}
    if local_addr:
        names.add(local_addr)
    return host in names or host.startswith("127.")


def _open_store(params, host, port, serve):
    """A TCPStore client of host:port; `serve` True/False/None (None: serve if we can bind)."""
    token = _read_token(params.token_file) if params.token_file else None
    if serve or serve is None:
        try:
            tcp = _store.TCPStore(host, port, is_master=True, timeout=params.join_timeout, token=token)
            tcp.set_timeout(params.read_timeout)
            log.info("serving the rendezvous store on port %d", tcp.port)
            return tcp, True
        except _store.StoreError as e:
            if serve:
                raise RendezvousConnectionError("cannot serve the rendezvous store on port %d: %s"
                                                % (port, e)) from e
            log.debug("not hosting the store (%s); connecting to %s:%d", e, host, port)
    if port == 0:
        raise ValueError("rdzv endpoint port 0 needs is_host=1 (this node picks the port and serves it)")
    try:
        tcp = _store.TCPStore(host, port, timeout=params.join_timeout, token=token)
    except _store.StoreAuthError as e:
        raise RendezvousError(str(e)) from e
    except _store.StoreError as e:
        raise RendezvousConnectionError(str(e)) from e
    tcp.set_timeout(params.read_timeout)
    return tcp, False


def get_rendezvous_handler(params):
    """The handler for ``params.backend``; connects to (or starts) the store."""
    if params.backend in ("c10d", "store"):
        serve = params.is_host
        if serve is None and not _is_local_host(params.host, params.local_addr):
            serve = False
        tcp, hosting = _open_store(params, params.host, params.port, serve)
        return RendezvousHandler(tcp, params, hosts_store=hosting)
    if params.backend == "static":
        tcp, hosting = _open_store(params, params.host, params.port, params.rank == 0)
        order = ["%09d" % params.rank]
        local_addr = params.host if params.rank == 0 else params.local_addr
        handler = RendezvousHandler(tcp, params, hosts_store=hosting, order=order,
                                    node_id="rank%d" % params.rank)
        handler.local_addr = local_addr or handler.local_addr
        return handler
    if params.backend == "etcd":
        etcd_store = _etcd_store_class()
        if etcd_store is None:
            raise RendezvousError("etcd backend not available yet")
        try:
            store = etcd_store(params.endpoints, timeout=params.join_timeout,
                               lease_ttl=max(1.0, params.heartbeat_timeout))
        except _store.StoreError as e:
            raise RendezvousConnectionError("cannot reach etcd at %s: %s" % (", ".join(params.endpoints), e)) from e
        store.set_timeout(params.read_timeout)
        return RendezvousHandler(store, params, hosts_store=False)
    raise ValueError("rdzv backend %r is unknown" % params.backend)


def _etcd_store_class():
    """EtcdStore: defined in this module once _etcd_part.py is merged in; until then that sibling file
    (standard library only), found by name so this module still works copied without it."""
    cls = globals().get("EtcdStore")
    if cls is not None:
        return cls
    import importlib
    for name in ((__package__ + "._etcd_part") if __package__ else None, "_etcd_part"):
        if name:
            try:
                return getattr(importlib.import_module(name), "EtcdStore", None)
            except ImportError:
                continue
    return None
