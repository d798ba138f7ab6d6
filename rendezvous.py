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
    handler.finished()                     # before shutdown(): this node is done, its leaving is no loss
    handler.broken_reason()                # why the round broke (one store read), or None

    store = open_run_store(params)         # from outside the run: a client that never serves,
    describe_run(store, "job42")           # and the run's rounds, members, beats and waiting nodes,
                                           # read with check/get/multi_get only (elasticrun status)

Backends. ``c10d`` (alias ``store``): endpoint ``host[:port]`` (default port 29400, ``[v6addr]:port``
for IPv6). The node the host names (its host name, an address of one of its interfaces, or a name
that resolves to one), or that has ``is_host=1``, serves the store in its own process; with no
explicit ``is_host`` a node that cannot bind the port (someone else on this machine already serves
it) becomes a client. Clients connect with jittered backoff until
``join_timeout``. ``static``: endpoint ``master_addr:master_port`` (default 29500), conf ``rank``; node
rank 0 serves the store, ranks are the given node ranks, ``min_nodes == max_nodes``. ``etcd`` runs the
same algorithm on a store object that speaks etcd. ``RendezvousHandler(store, params)`` runs it over
any object with the store API (``set get add compare_set wait check multi_get``).

Configuration (``--rdzv-conf``; every value checked, a bad one raises a one-line ``ValueError``):
``join_timeout`` 600, ``last_call_timeout`` 30, ``close_timeout`` 30, ``heartbeat_interval`` 5,
``heartbeat_timeout`` 15, ``read_timeout`` 60 (seconds), ``is_host`` (bool), ``token_file`` (shared
secret for the store; c10d and static only), ``rank`` (static only); torch's ``keep_alive_interval``
and ``keep_alive_max_attempt`` (default 3) set ``heartbeat_interval`` and ``heartbeat_timeout``
(their product) when those are not given, and torch's ``timeout`` sets ``join_timeout`` when that is
not given. Keys it does not know are ignored with a warning naming them (as torch ignores them), and
so is ``is_host`` for etcd. ``close_timeout`` is accepted for torchrun compatibility
and checked, but nothing waits on it: closing here is a single store write. ``exclude_after``,
``exclude_window`` and ``exclude_cooldown``: see "Bad nodes and spares" below.

The algorithm: one round is an atomic counter plus one wake-up key. Every joiner does one ``add`` on
the round's counter; the value returned is its slot (1, 2, 3, ...). It writes its record (id, address,
a free port) under that slot and then blocks on the round's ``done`` key with one parked ``get``::

    node    add(arrive,1)  set(node/slot)        wait(done) ..... get(done), get(rank/slot) -> rank
    slot 1 ----[1]------------[rec]---------------------------------------------------+
    slot 2 ----[2]------------[rec]  <- the closer: slot == min_nodes                  |
                                     wait(gate)   previous round released? (r > 0)     |
                                     wait(full, last_call_timeout)  slot max sets full |
                                     add(arrive, FREEZE) -> exact member count, atomic |
                                     multi_get(node/1..n), drop the dead, sort,        |
                                     multi_set(rank/1..n, members), compare_set(done) -+
    slot 3 ----[3]------------[rec]  (arrived during the last call: a member)
    late   ----[FREEZE+4]  -> round closed: join the next round and wait there

Exactly one node (the one whose ``add`` returned ``min_nodes``) closes a round, so there is no
compare-and-set loop: per round each node does about seven store operations of a few dozen bytes
each (``done`` holds the world size and master address, ``rank/<slot>`` the node's rank) and the
closer one ``multi_get`` and one ``multi_set`` of n records, O(nodes) operations and bytes in all. The ``FREEZE`` add both counts the members exactly and turns every
later ``add`` into a "too late" answer, with no lock. ``done`` is written with ``compare_set`` so that
``set_closed()`` can race the closer and exactly one outcome wins. Ranks: members sorted by (address,
node id) (static: by node rank), so a node keeps its rank across rounds when membership allows; when
more than ``max_nodes`` arrived, members of the previous round are kept first.

Dead joiners are left out: torch drops them too, and a round formed with one breaks a
``heartbeat_timeout`` after it starts, only to be formed again. Each waiting node beats its slot's
``alive`` key every ``heartbeat_interval``; the closer reads those keys each time it wakes during the
gate and last-call waits, and at the freeze, after reading the records, it leaves out every joiner
whose key it saw unchanged for ``heartbeat_timeout`` (by its own clock) or whose ephemeral key has
vanished. In rounds after the first, joiners (spares, returning members) write their ephemeral
``alive`` key before their record, so a dead one is known at once even to a closer that does not
wait; in the first round that is not done (one more operation per node, where nodes usually arrive
together), and a joiner that dies before its first beat is known by its silence only. When leaving
out the dead leaves fewer than ``min_nodes``, the outcome is "retry" and everyone moves to the next
round.

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
is dead, and the observer marks the round broken. Silence is counted only over time the observer's
own loop ran on schedule: after a loop that took far longer than the interval (this process was
frozen by SIGSTOP or a stalled VM, or the store did not answer) the count starts again, so a node
that was itself frozen never blames its peers for the beats it could not see. Every dead member has
a live predecessor in the ring unless all are dead, so one death is always seen. A member that
called ``finished()`` (its work is done) is no loss when it leaves: its observer watches the next
member of the ring instead. ``round_broken()``
reads a local flag (free to poll). A store whose object has ``set_ephemeral`` (etcd leases; the TCP
store, whose server deletes such a key when its client's connection closes) gets heartbeat and
``alive`` keys that vanish with their writer; a vanished key counts as dead at once. Peeks at such
keys never block: a ``compare_set`` that expects a value no beat writes returns the value, or the
expected value itself when the key is gone. When the store also has ``wait_gone`` (ours, and etcd by
a watch), a member sleeps between beats in one parked ``wait_gone`` on its neighbour's heartbeat key
and the round's ``intact`` key, which marking a round broken deletes: a member whose process dies is
known the moment its connection closes (etcd: when its lease, ``heartbeat_timeout``, ends), and every
other member the moment after, with no polling; the heartbeat timeout is left for silent failures (a
cut link, a frozen host). Losing the store connection marks the round broken and the next call
raises ``RendezvousConnectionError`` instead of hanging.

Narration. A wait that lasts longer than about 2 s says, at INFO on this module's logger, what it
waits for and how long it will still wait, then again every ~10 s (the gap grows by half each time,
up to a minute; never two lines within a second): "waiting for nodes: 1 of 2 joined (min 2), 583 s
left"; "last call: 3 of 1:4 joined, closing in 27 s"; "waiting for round 2 to end: 1 node(s)
waiting to join, 590 s left". A broken round is said once, naming the node by the host name its
join record carries (never resolved): "round 3 broken: node gpu07 (rank 5) silent for 15 s; waiting
for a new round".

Mistakes refused. A node's first join compares the settings the caller passes as
``RendezvousParameters(job={name: value})`` with the run's record (``job``, written by the run's
first node with ``compare_set``; a setting the record lacks is added, so the first node of another
role records that role's values). The launcher passes ``nnodes``, and ``nproc_per_node (role R)``
and ``script (role R)`` (the script line, shortened, with a checksum of the path and arguments). A
node that differs gets ``RendezvousMismatchError`` naming each differing value on both sides,
before it takes a slot, so the run is untouched. A closed run refuses every node that had not
joined it (``RendezvousClosedError`` with ``late``).

Bad nodes and spares (off by default). With ``exclude_after=K`` (``exclude_window`` 3600 s,
``exclude_cooldown`` 3600 s), the caller reports each job failure whose root cause was this node's
workers to ``note_root_cause(why)``; the K-th within the window excludes the node: it records
``excluded/<address>`` (until when, and why), leaves its round and gets ``RendezvousExcludedError``;
a node with that address that tries to join before the cooldown ends is refused with the same
error, naming the time it may return. The node serving the c10d store is never excluded (it would
take the store with it). The others re-form without it once ``min_nodes`` are there. Nodes started
beyond ``max_nodes`` wait in the next round as spares (the log says so); when a member is lost or
excluded, the next round forms with them in its place (returning members are chosen first, so a
spare never displaces a healthy member).

Key layout (``R`` = the run id, percent-quoted so run ids never overlap; ``r`` = round number)::

    elastic/R/closed            "1" once set_closed()
    elastic/R/open              hint: the lowest round that may still take joiners
    elastic/R/job               JSON {"host", "settings"} of the run's first node; the others must match
    elastic/R/excluded/<addr>   JSON {"host", "since", "until", "why"}: that host is kept out until then
    elastic/R/r/arrive          joins + REJOIN * returning members (+ FREEZE once closed)
    elastic/R/r/node/<slot>     JSON record of the node in that slot
    elastic/R/r/alive/<slot>    beats of that node while it waits (ephemeral when the store can)
    elastic/R/r/gate            the previous round has ended (or there was none)
    elastic/R/r/full            slot max_nodes has arrived: close without waiting out the last call
    elastic/R/r/closer          id of the node closing the round (changed only by a takeover)
    elastic/R/r/closer_hb       the closer's heartbeat counter while it waits
    elastic/R/r/frozen          the member count the FREEZE add returned
    elastic/R/r/rank/<slot>     JSON {"rank": k or null (not a member), "next": host name of rank k+1}
    elastic/R/r/members         JSON [[address, node id, host name], ...] by rank (read on demand)
    elastic/R/r/done            outcome: JSON world size and master address, or "closed", or "retry"
    elastic/R/r/hb/<rank>       heartbeat counter of the member with that rank
    elastic/R/r/intact          set with done; deleted when the round breaks (wakes wait_gone)
    elastic/R/r/broken          > 0 once a member died or left; reason in broken_why
    elastic/R/r/finished/<rank> that member's work is done: its leaving breaks nothing (finished())
    elastic/R/r/user/...        RendezvousInfo.store: the agents' own keys for this round

Errors: ``RendezvousError`` is the root; ``RendezvousTimeoutError`` (also ``TimeoutError``) says how
many nodes joined of how many needed; ``RendezvousClosedError``; ``RendezvousConnectionError`` (also
``ConnectionError``) when the store cannot be reached or went away.

Sections, in order: Constants and errors, Parameters, Results, Handler, etcd backend, Backends.

It borrows from ``store`` only the private helpers that module's docstring lists. ``elastic`` may use
from here, and nothing else private: ``_BACKENDS`` (the backend names ``RendezvousParameters``
accepts: the launcher asks this list, so a new backend is added in this file alone) and ``_free_port``.
"""

__version__ = "0.1.0"
__all__ = [
    "RendezvousParameters", "RendezvousHandler", "RendezvousInfo", "get_rendezvous_handler",
    "RendezvousError", "RendezvousTimeoutError", "RendezvousClosedError", "RendezvousConnectionError",
    "RendezvousMismatchError", "RendezvousExcludedError", "EtcdStore", "describe_run", "open_run_store",
]

import base64
import ipaddress
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from urllib.parse import quote

try:  # vendored inside a package
    from . import store as _store
except ImportError:  # top-level module
    import store as _store

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- Constants and errors

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
_MAX_SECONDS = 1e6                          # about 11.5 days
_OTHER_KEYS = ("is_host", "token_file", "rank", "keep_alive_interval", "keep_alive_max_attempt",
               "exclude_after", "exclude_window", "exclude_cooldown", "timeout")
_EXCLUDE_DEFAULTS = {"exclude_window": 3600.0, "exclude_cooldown": 3600.0}
_TORCH_ONLY_KEYS = ("store_type", "use_libuv", "local_addr")   # accepted from torchrun users, unused
_BACKENDS = ("c10d", "store", "static", "etcd")
_CLOSED, _RETRY = "closed", "retry"
_NO_BEAT = b"\x00no beat"                   # a value no heartbeat key ever holds (see _peek)


class RendezvousError(Exception):
    """Root of this module's errors."""


class RendezvousTimeoutError(RendezvousError, TimeoutError):
    """Not enough nodes joined in time; the message says how many joined of how many needed."""


class RendezvousClosedError(RendezvousError):
    """The run was closed (``set_closed()``); no further rounds will form.

    ``late`` is True when it was closed before this node ever joined: a finished run's id reused,
    or a node started after its job ended.
    """

    def __init__(self, message, late=False):
        super().__init__(message)
        self.late = late


class RendezvousConnectionError(RendezvousError, ConnectionError):
    """The store could not be reached, or went away."""


class RendezvousMismatchError(RendezvousError, ValueError):
    """This node's job settings differ from those of the run it tried to join (the message names
    both values); it was refused before joining, so the run is untouched."""


class RendezvousExcludedError(RendezvousError):
    """This node's host is excluded from the run: its workers were the root cause of
    ``exclude_after`` failures within ``exclude_window``. Raised by ``note_root_cause()`` when the
    node must leave, and by ``next_rendezvous()`` when the host comes back before ``until`` (epoch
    seconds, this host's clock)."""

    def __init__(self, message, host=None, until=None):
        super().__init__(message)
        self.host, self.until = host, until


# --------------------------------------------------------------------------------------- Parameters

def _parse_endpoint(endpoint, default_port):
    """``host``, ``host:port``, ``[v6]:port``, ``[v6]`` or a bare IPv6 address -> (host, port).

    The host must be a name, an IPv4 or an IPv6 address: a URL, a list or a stray colon is an
    error here rather than a failed lookup later.
    """
    text = (endpoint or "").strip()
    if not text:
        return "127.0.0.1", default_port
    port_text = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("rdzv endpoint %r: missing ']' after the IPv6 address" % endpoint)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("rdzv endpoint %r: expected ':PORT' after ']'" % endpoint)
            port_text = rest[1:]
        if host and not _is_ipv6(host):
            raise ValueError("rdzv endpoint %r: %r is not an IPv6 address" % (endpoint, host))
    elif text.count(":") > 1:
        if not _is_ipv6(text):
            raise ValueError("rdzv endpoint %r is not HOST[:PORT] (write an IPv6 address with a port "
                             "as [ADDRESS]:PORT)" % endpoint)
        return text, default_port
    else:
        host, _, port_text = text.partition(":") if ":" in text else (text, "", None)
        if host and not _HOST_NAME.match(host):
            raise ValueError("rdzv endpoint %r: host %r is not a host name or an address" % (endpoint, host))
    if not host:
        _bad_endpoint(endpoint)
    if port_text is None:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("rdzv endpoint %r: port %r is not a number" % (endpoint, port_text)) from None
    if not 0 <= port <= 65535:
        raise ValueError("rdzv endpoint %r: port %d is outside 0..65535" % (endpoint, port))
    return host, port


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")


def _is_ipv6(text):
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
        return True
    except ValueError:
        return False


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
    (``join_timeout``, ``heartbeat_interval``, ``is_host`` (None when not given), ``host``, ``port``,
    ``exclude_after`` (0: off), ``exclude_window``, ``exclude_cooldown``...). ``job``: the settings
    the nodes of the run must share, ``{name: value}`` (the launcher gives ``nnodes``, and
    ``nproc_per_node`` and ``script`` of its role); see "Mistakes refused" in the module docstring.
    """

    def __init__(self, backend, endpoint, run_id, min_nodes, max_nodes, local_addr=None, *, token=None,
                 job=None, **config):
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
        # torch ignores keys it does not know (a job's conf may carry another backend's keys); a
        # warning names them, so a misspelt key is seen
        known = set(_TIMEOUTS) | set(_OTHER_KEYS) | set(_TORCH_ONLY_KEYS)
        self.ignored_keys = sorted(k for k in self.config if k not in known)
        if backend == "etcd" and "is_host" in self.config:
            self.ignored_keys.append("is_host")   # etcd serves the rendezvous; torch ignores it too
        for key in self.ignored_keys:
            if key != "is_host":
                log.warning("rdzv conf key %r is not known and is ignored; known keys: %s",
                            key, ", ".join(sorted(list(_TIMEOUTS) + list(_OTHER_KEYS))))
        for key, default in _TIMEOUTS.items():
            value = self.config.get(key, default) if key in self.config else self._torch_keep_alive(key, default)
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                raise ValueError("rdzv conf %s=%r is not a number of seconds" % (key, value)) from None
            if not 0 < seconds <= _MAX_SECONDS:   # also nan and inf; past the cap a wait overflows
                raise ValueError("rdzv conf %s=%r must be a number of seconds > 0 and at most %g"
                                 % (key, value, _MAX_SECONDS))
            setattr(self, key, seconds)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("rdzv conf heartbeat_timeout=%g must exceed heartbeat_interval=%g"
                             % (self.heartbeat_timeout, self.heartbeat_interval))
        self.is_host = None
        if "is_host" in self.config and "is_host" not in self.ignored_keys:
            self.is_host = _as_bool("is_host", self.config["is_host"])
        token_file = self.config.get("token_file")
        if token_file is not None and (not isinstance(token_file, str) or not token_file):
            raise ValueError("rdzv conf token_file=%r is not a path" % (token_file,))
        if token_file and not os.access(token_file, os.R_OK):
            raise ValueError("rdzv conf token_file=%r cannot be read" % (token_file,))
        self.token_file = token_file or None
        if token is not None and (not isinstance(token, (str, bytes)) or not token):
            raise ValueError("rdzv token must be a non-empty str or bytes")
        if token is not None and self.token_file:
            raise ValueError("give the rdzv store a token or a token_file, not both")
        self.token = token   # kept out of repr() and config: a secret
        self._exclusion_settings(backend)
        if job is not None and not isinstance(job, dict):
            raise ValueError("job must be a dict of setting names and values, got %r" % (job,))
        self.job = {str(k): str(v) for k, v in (job or {}).items()}
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
            if token is not None:
                raise ValueError("a token is not for the etcd backend (secure etcd with its own access control)")
            if "token_file" in self.config:
                raise ValueError("rdzv conf token_file is not for the etcd backend (etcd serves the "
                                 "rendezvous; secure it with etcd's own access control)")
            self.host, self.port = None, None
            self.endpoints = _parse_etcd_endpoints(self.endpoint)
        else:
            default = _DEFAULT_STATIC_PORT if backend == "static" else _DEFAULT_C10D_PORT
            self.host, self.port = _parse_endpoint(self.endpoint, default)

    def _exclusion_settings(self, backend):
        """exclude_after (0: off), exclude_window and exclude_cooldown, checked."""
        config = self.config
        self.exclude_after = _as_int("rdzv conf exclude_after", config.get("exclude_after", 0), 0)
        for key, default in _EXCLUDE_DEFAULTS.items():
            value = config.get(key, default)
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                raise ValueError("rdzv conf %s=%r is not a number of seconds" % (key, value)) from None
            if not 0 < seconds <= _MAX_SECONDS:
                raise ValueError("rdzv conf %s=%r must be a number of seconds > 0 and at most %g"
                                 % (key, value, _MAX_SECONDS))
            if key in config and not self.exclude_after:
                raise ValueError("rdzv conf %s needs exclude_after=K (K >= 1 failures; exclusion is off)" % key)
            setattr(self, key, seconds)
        if self.exclude_after and backend == "static":
            raise ValueError("rdzv conf exclude_after needs the c10d or etcd backend: the static "
                             "backend's nodes have fixed ranks, so none can leave")

    def _torch_keep_alive(self, key, default):
        """torch's names for the heartbeat: a node is dead after keep_alive_max_attempt (3) silent
        intervals; and for the join timeout: ``timeout`` (torch's static and etcd backends)."""
        if key == "join_timeout":
            return self.config.get("timeout", default)
        torch_style = "keep_alive_interval" in self.config or "keep_alive_max_attempt" in self.config
        if not torch_style:
            return default
        if key == "heartbeat_interval":
            return self.config.get("keep_alive_interval", default)
        if key == "heartbeat_timeout":
            attempts = _as_int("rdzv conf keep_alive_max_attempt", self.config.get("keep_alive_max_attempt", 3), 2)
            return self.heartbeat_interval * attempts
        return default

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
    urls = [part for part in (endpoint or "").split(",") if part.strip()]
    if not urls:
        raise ValueError("the etcd backend needs an endpoint: http://host:port[,http://host:port...]")
    result = []
    for url in urls:
        _, host, port = _etcd_url(url)
        result.append("http://%s:%d" % ("[%s]" % host if ":" in host else host, port))
    return result


def _etcd_url(raw):
    """``[http://]host[:port][/]`` -> (host:port as written, host, port); no name lookup."""
    text = raw.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme != "http":
        raise ValueError("etcd endpoint %r: scheme must be http (TLS is not supported)" % raw)
    hostport = rest.split("/", 1)[0]
    host, port = _parse_endpoint(hostport, ETCD_DEFAULT_PORT)
    if not hostport or port == 0:
        raise ValueError("etcd endpoint %r: expected http://host:port" % raw)
    return hostport, host, port


# ------------------------------------------------------------------------------------------ Results

class RendezvousInfo:
    """What a completed round gives this node."""

    __slots__ = ("store", "rank", "world_size", "master_addr", "master_port", "round", "_members")

    def __init__(self, store, rank, world_size, master_addr, master_port, round, members=()):
        self.store = store                  # PrefixStore private to this run and round
        self.rank = rank                    # this node's group rank, 0..world_size-1
        self.world_size = world_size
        self.master_addr = master_addr      # rank-0 node's address
        self.master_port = master_port      # a free port on the rank-0 node, new each round
        self.round = round
        self._members = members

    @property
    def members(self):
        """(address, node id, host name) of each member, by rank; read from the store on first use
        (a round of n nodes does not send every node all n records)."""
        if isinstance(self._members, _LazyMembers):
            self._members = self._members.load()
        return list(self._members)

    def __repr__(self):
        return ("RendezvousInfo(rank=%d, world_size=%d, master_addr=%r, master_port=%d, round=%d)"
                % (self.rank, self.world_size, self.master_addr, self.master_port, self.round))


class _LazyMembers:
    """The round's member list, read from its ``members`` key when first asked for."""

    def __init__(self, store, key):
        self.store, self.key = store, key

    def load(self):
        return [tuple(m) for m in json.loads(self.store.get(self.key).decode("utf-8"))]


class _Keys:
    """Key names of one run (see the key layout in the module docstring)."""

    def __init__(self, run_id):
        self.base = "elastic/" + quote(run_id, safe="")
        self.closed = self.base + "/closed"
        self.open = self.base + "/open"
        self.job = self.base + "/job"

    def excluded(self, host):
        return "%s/excluded/%s" % (self.base, quote(host, safe=""))

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


def _utc(epoch):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _node_id():
    return "%s-%d-%s" % (socket.gethostname(), os.getpid(), "%06x" % random.getrandbits(24))


# ------------------------------------------------------------------------------------------ Handler

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
        self.host_name = socket.gethostname()    # names this node in others' messages (never resolved)
        self.local_addr = params.local_addr or self.host_name
        self.node_id = node_id or _node_id()
        self._order = list(order) if order is not None else [self.local_addr, self.node_id]
        # etcd leases, or a TCP store server that knows EPHEMERAL: keys that vanish with their writer
        self._ephemeral = (callable(getattr(store, "set_ephemeral", None))
                           and getattr(store, "supports_ephemeral", True))
        self._round = None              # last completed round this node is a member of
        self._finished = None           # the round whose members were told this node is done
        self._rank = None
        self._world_size = 0
        self._broken = threading.Event()
        self._lost = None               # the StoreConnectionError that ended the store
        self._beat_stop = None
        self._beat_thread = None
        self._closed_seen = False
        self._joined = False            # next_rendezvous has joined a round at least once
        self._faults = []               # monotonic times of failures this node's workers caused
        self._spare = False             # this node waits for a place in a full job
        self._next_host = None          # host name of the member we watch (rank + 1)

    @property
    def store(self):
        """The underlying store object (the agents may use it for their own keys)."""
        return self._store

    def get_run_id(self):
        return self._params.run_id

    @property
    def params(self):
        """The RendezvousParameters this handler runs with (to read, not to change)."""
        return self._params

    # -- joining

    def next_rendezvous(self):
        """Join the next round and block until it completes with this node in it."""
        params = self._params
        deadline = time.monotonic() + params.join_timeout
        with self._mapped_errors():
            if self._closed_seen or self._store.check([self._keys.closed]):
                self._stop_heartbeat()
                self._closed_seen = True
                if not self._joined:
                    raise RendezvousClosedError(
                        "rendezvous of run %r was closed before this node joined: a job with this run id "
                        "has finished (give each job its own run id)" % params.run_id, late=True)
                raise RendezvousClosedError("rendezvous of run %r is closed" % params.run_id)
            if not self._joined:
                self._admit()
            self._joined = True
            previous = self._round
            r = self._read_open()
            if previous is not None:
                r = max(r, previous + 1)
            if self._round is not None and not self._broken.is_set():
                self._leave_round("node %s (rank %d) rejoined" % (self.host_name, self._rank))
            self._stop_heartbeat()
            self._round, self._rank, self._world_size = None, None, 0
            self._broken = threading.Event()    # a fresh flag: a late old heartbeat thread sets its own
            while True:
                info = self._try_round(r, deadline, rejoin=previous is not None and r == previous + 1)
                if info is not None:
                    if self._spare:
                        self._spare = False
                        log.info("spare %s steps in: round %d of run %r formed with it, rank %d of %d",
                                 self.local_addr, info.round, params.run_id, info.rank, info.world_size)
                    return info
                r += 1

    def _admit(self):
        """Refuse, before joining, a host the run excluded and a node whose job settings differ
        from the run's (see "Mistakes refused" and "Bad nodes" in the module docstring)."""
        store, params, keys = self._store, self._params, self._keys
        excluded = keys.excluded(self.local_addr)
        if store.check([excluded]):
            record = json.loads(store.get(excluded).decode("utf-8"))
            if time.time() < record["until"]:
                raise RendezvousExcludedError(
                    "host %s was excluded from run %r at %s (%s); it is refused until %s "
                    "(exclude_cooldown), or give the job another run id"
                    % (self.local_addr, params.run_id, _utc(record["since"]), record["why"],
                       _utc(record["until"])), host=self.local_addr, until=record["until"])
        mine = params.job
        value = json.dumps({"host": self.local_addr, "settings": mine}, sort_keys=True).encode("utf-8")
        current = store.compare_set(keys.job, "", value)
        while current != value:
            record = json.loads(current.decode("utf-8"))
            theirs = record["settings"]
            differ = ["%s %s here, %s in the run" % (name, mine[name], theirs[name])
                      for name in sorted(mine) if name in theirs and mine[name] != theirs[name]]
            if differ:
                raise RendezvousMismatchError(
                    "this node does not match run %r (as its first node, %s, started it): %s; refusing "
                    "to join (start every node with the same options, or give this job its own run id)"
                    % (params.run_id, record["host"], "; ".join(differ)))
            if set(mine) <= set(theirs):
                return
            # settings the run has no value for yet (the first node of another role): add ours
            value = json.dumps({"host": record["host"], "settings": dict(mine, **theirs)},
                               sort_keys=True).encode("utf-8")
            current, value = store.compare_set(keys.job, current, value), value

    def note_root_cause(self, why):
        """Count one job failure whose root cause was this node's workers (`why` says which).

        Off while ``exclude_after`` is 0. When it makes ``exclude_after`` failures within
        ``exclude_window`` seconds, this host is excluded: the record (``excluded/<address>``) keeps
        it out of the run until ``exclude_cooldown`` has passed, and RendezvousExcludedError tells
        the caller to stop its workers and leave (``shutdown()``); the other nodes form the next
        round without it, a spare taking its place. The node serving the store is never excluded
        (leaving would take the store from the job); it says so and carries on.
        """
        params = self._params
        if not params.exclude_after:
            return
        now = time.monotonic()
        self._faults = [t for t in self._faults if now - t <= params.exclude_window] + [now]
        if len(self._faults) < params.exclude_after:
            log.info("%s: failure %d of %d within %g s that this node caused (exclude_after)",
                     self.local_addr, len(self._faults), params.exclude_after, params.exclude_window)
            return
        reason = "its workers were the root cause of %d failure%s within %g s, the last: %s" % (
            len(self._faults), "s" if len(self._faults) > 1 else "", params.exclude_window, why)
        if self.hosts_store:
            log.warning("this node (%s) serves the rendezvous store, so it stays although %s",
                        self.local_addr, reason)
            return
        since = time.time()
        until = since + params.exclude_cooldown
        with self._mapped_errors():
            self._store.set(self._keys.excluded(self.local_addr), json.dumps(
                {"host": self.local_addr, "since": since, "until": until, "why": reason}))
            if self._round is not None and self._lost is None:
                self._leave_round("node %s (%s) excluded: %s" % (self.host_name, self.local_addr, reason))
        raise RendezvousExcludedError(
            "host %s leaves run %r, excluded until %s (exclude_cooldown=%g s): %s"
            % (self.local_addr, params.run_id, _utc(until), params.exclude_cooldown, reason),
            host=self.local_addr, until=until)

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
        record = {"id": self.node_id, "addr": self.local_addr, "host": self.host_name, "order": self._order,
                  "port": _free_port(), "rejoin": rejoin}
        if self._ephemeral and r > 0:
            # a spare or a returning member, likely to wait for the running round to end: the alive
            # key before the record, so a record whose key is missing tells the closer that its
            # writer is gone, not that it has yet to write the key (see _Joiners)
            self._beat(keys.round(r, "alive/%d" % slot), 1)
        store.set(keys.round(r, "node/%d" % slot), json.dumps(record))
        if slot == params.max_nodes:
            store.set(keys.round(r, "full"), "1")
        if r > 0 and not rejoin and not self._spare:
            self._say_if_spare(r)
        if slot == params.min_nodes:
            self._close_round(r, deadline, slot=slot)
        outcome = self._await(r, keys.round(r, "done"), deadline, slot, watch_closer=True)
        if outcome == _CLOSED:
            self._closed_seen = True
            raise RendezvousClosedError("rendezvous of run %r is closed" % params.run_id)
        if outcome == _RETRY:
            return None
        if outcome.startswith("error:"):
            raise RendezvousError(outcome[len("error:"):])
        result = json.loads(outcome)
        mine = json.loads(store.get(keys.round(r, "rank/%d" % slot)).decode("utf-8"))
        rank, world_size = mine["rank"], result["world_size"]
        if rank is None:
            log.info("round %d of run %r formed without this node (max_nodes=%d); waiting for the next",
                     r, params.run_id, params.max_nodes)
            return None
        self._round, self._rank, self._world_size = r, rank, world_size
        self._next_host = mine.get("next")
        self._start_heartbeat(r, rank, world_size)
        prefix = keys.round(r, "user")
        log.info("rendezvous round %d of run %r complete: rank %d of %d, master %s:%d",
                 r, params.run_id, rank, world_size, result["master_addr"], result["master_port"])
        return RendezvousInfo(_store.PrefixStore(prefix, store), rank, world_size,
                              result["master_addr"], result["master_port"], r,
                              _LazyMembers(store, keys.round(r, "members")))

    def _say_if_spare(self, r):
        """A node arriving while round r - 1 runs with max_nodes members waits as a spare: say so."""
        store, params, keys = self._store, self._params, self._keys
        done = keys.round(r - 1, "done")
        if not store.check([done]):
            return
        outcome = store.get(done)
        if not outcome.startswith(b"{"):
            return
        outcome = json.loads(outcome.decode("utf-8"))
        world = outcome["world_size"] if "world_size" in outcome else len(outcome["members"])
        if world < params.max_nodes or store.add(keys.round(r - 1, "broken"), 0) > 0:
            return
        self._spare = True
        log.info("%s waits as a spare: round %d of run %r runs with %d of at most %d nodes; a spare takes "
                 "the place of a node lost or excluded", self.local_addr, r - 1, params.run_id, world,
                 params.max_nodes)

    def _await(self, r, key, deadline, slot, watch_closer=False):
        """The value of `key`, waiting until `deadline`; a timeout names the join count.

        `watch_closer`: while waiting, beat our slot's alive key (see _Joiners) and check every
        heartbeat_interval that round r's closer still beats; when it has been silent for
        heartbeat_timeout, take its place (one node wins).
        """
        store, params, keys = self._store, self._params, self._keys
        seen, changed, suspect = None, time.monotonic(), ""
        alive, beats = keys.round(r, "alive/%d" % slot) if watch_closer else None, 1
        narrator = _Narrator()
        check = time.monotonic() + params.heartbeat_interval
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise self._timeout(r, slot)
            try:
                store.wait([key], max(0.0, min(remaining, check - now if watch_closer else remaining,
                                               narrator.until())))
                return store.get(key).decode("utf-8")
            except _store.StoreTimeout:
                pass
            if narrator.due():
                narrator.say(self._joining_status(r, deadline))
            if not watch_closer or time.monotonic() < check:
                continue
            check = time.monotonic() + params.heartbeat_interval
            if alive is not None:
                beats += 1
                self._beat(alive, beats)
            value, now = store.add(keys.round(r, "closer_hb"), 0), time.monotonic()
            if value != seen:
                # whose beat this is: a closer names itself before its first beat (a failed claim
                # below resets `seen`, so a closer named after this read is read on the next turn)
                seen, changed = value, now
                closer = keys.round(r, "closer")
                suspect = store.get(closer).decode("utf-8") if value or store.check([closer]) else ""
            elif value == 0 and store.add(keys.round(r, "arrive"), 0) & _SLOT_MASK < params.min_nodes:
                changed = now                  # no closer yet: min_nodes have not arrived
            elif now - changed > params.heartbeat_timeout:
                dead = self._take_over(r, suspect, now - changed)
                if dead is not None:
                    self._close_round(r, deadline, dead=dead, slot=slot)
                seen, changed = None, time.monotonic()

    def _joining_status(self, r, deadline):
        """What a joiner waits for, for the narration (two store reads)."""
        store, params, keys = self._store, self._params, self._keys
        value = store.add(keys.round(r, "arrive"), 0)
        joined, left = value & _SLOT_MASK, max(0, deadline - time.monotonic())
        if value >= _FREEZE:
            return "round %d closed with %d node(s); waiting for its outcome, %.0f s left" % (r, joined, left)
        if joined < params.min_nodes:
            return "waiting for nodes: %d of %d joined (min %d), %.0f s left" % (
                joined, params.max_nodes, params.min_nodes, left)
        if r > 0 and not store.check([keys.round(r, "gate")]):
            return "waiting for round %d to end: %d node(s) waiting to join, %.0f s left" % (r - 1, joined, left)
        return "waiting for round %d to close: %d of %s joined, %.0f s left" % (r, joined, self._span(), left)

    def _span(self):
        params = self._params
        if params.min_nodes == params.max_nodes:
            return str(params.max_nodes)
        return "%d:%d" % (params.min_nodes, params.max_nodes)

    def _take_over(self, r, suspect, silence):
        """Claim round r's closing from `suspect`, the closer we saw silent; its id when we won.

        Only from that closer: when another node noticed the same silence and took over first,
        the closer is now that live node, and the claim fails instead of unseating it.
        """
        key = self._keys.round(r, "closer")
        if self._store.compare_set(key, suspect, self.node_id).decode("utf-8") != self.node_id:
            return None
        log.warning("round %d of run %r: the closer %s was silent for %.1f s; %s closes the round",
                    r, self._params.run_id, suspect or "(unknown)", silence, self.node_id)
        return suspect

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

    def _close_round(self, r, deadline, dead=None, slot=None):
        """This node (in `slot`) is the round's closer: wait for the gate and the last call, then
        decide, leaving out the joiners known to be dead.

        `dead`: we took over from that silent closer; it is left out, and the last call (which
        began before it died and lasted at least heartbeat_timeout since) is not waited again.
        """
        store, params, keys = self._store, self._params, self._keys
        beat = keys.round(r, "closer_hb")
        if dead is None:
            store.set(keys.round(r, "closer"), self.node_id)
        store.add(beat, 1)
        joiners = _Joiners(self, r, slot)

        def wait_beating(key, until, all_silent=None, status=None):
            narrator = _Narrator()
            check = time.monotonic() + params.heartbeat_interval
            while True:
                now = time.monotonic()
                left = until - now
                if left <= 0:
                    return False
                try:
                    store.wait([key], max(0.0, min(left, check - now, narrator.until())))
                    return True
                except _store.StoreTimeout:
                    pass
                if status is not None and narrator.due():
                    narrator.say(status(until))
                if time.monotonic() < check:
                    continue
                check = time.monotonic() + params.heartbeat_interval
                store.add(beat, 1)
                joiners.watch()
                if all_silent is not None and all_silent():
                    return True

        def joined():
            return store.add(keys.round(r, "arrive"), 0) & _SLOT_MASK

        def gate_status(until):
            return "waiting for round %d to end: %d node(s) waiting to join, %.0f s left" % (
                r - 1, joined(), max(0, until - time.monotonic()))

        def last_call_status(until):
            return "last call: %d of %s joined, closing in %.0f s" % (
                joined(), self._span(), max(0, until - time.monotonic()))

        if r > 0:
            if not wait_beating(keys.round(r - 1, "done"), deadline):
                raise self._timeout(r, None)
            previous = store.get(keys.round(r - 1, "done"))
            if previous.startswith(b"{"):   # a round ran before this one: wait for it to end
                world = json.loads(previous.decode("utf-8"))["world_size"]
                silent = _AllSilent([keys.round(r - 1, "hb/%d" % i) for i in range(world)], self._peek_all,
                                    params.heartbeat_timeout, self._stall_limit())
                if not wait_beating(keys.round(r, "gate"), deadline, silent, gate_status):
                    raise self._timeout(r, None)
                if silent.fired:
                    log.warning("round %d of run %r: every member of round %d is silent; forming round %d",
                                r, params.run_id, r - 1, r)
        if params.min_nodes < params.max_nodes and dead is None:
            wait_beating(keys.round(r, "full"), min(deadline, time.monotonic() + params.last_call_timeout),
                         status=last_call_status)
        value = store.add(keys.round(r, "arrive"), _FREEZE)
        frozen = keys.round(r, "frozen")
        if value < 2 * _FREEZE:                       # we froze it: the count is exact
            joined = (value - _FREEZE) & _SLOT_MASK
            store.set(frozen, str(joined))
        else:                                         # a closer before us froze it, then went silent
            joined = int(store.get(frozen)) if store.check([frozen]) else value & _SLOT_MASK
        names = [keys.round(r, "node/%d" % s) for s in range(1, joined + 1)]
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
        gone = joiners.dead(entries)       # read after the records (see _Joiners)
        if gone:
            log.warning("round %d of run %r: leaving out %d dead joiner(s): %s", r, params.run_id, len(gone),
                        ", ".join(e["id"] for e in entries if e["slot"] in gone))
            entries = [e for e in entries if e["slot"] not in gone]
        chosen = sorted(entries, key=lambda e: (not e["rejoin"], e["slot"]))[:params.max_nodes]
        members = sorted(chosen, key=lambda e: (e["order"], e["id"]))
        orders = [tuple(e["order"]) for e in members]
        if len(members) < params.min_nodes:
            outcome = _RETRY
        elif len(set(orders)) != len(orders) and params.backend == "static":
            outcome = "error:two nodes of run %r claim the same static rank: %s" % (
                params.run_id, sorted(o[0] for o in orders))
        else:
            outcome = json.dumps({"world_size": len(members), "master_addr": members[0]["addr"],
                                  "master_port": members[0]["port"]})
        # every joiner reads done (small) and then its own slot's rank key: O(1) bytes per node,
        # where a member list in done would send every node all n records (O(n^2) in all)
        names, values = [keys.open, keys.round(r, "intact")], [str(r + 1), "1"]
        if outcome.startswith("{"):
            hosts = [e.get("host") or e["addr"] for e in members]
            ranks = {e["slot"]: k for k, e in enumerate(members)}
            for joiner in range(1, joined + 1):
                k = ranks.get(joiner)
                names.append(keys.round(r, "rank/%d" % joiner))
                values.append(json.dumps({"rank": k, "next": hosts[(k + 1) % len(members)]} if k is not None
                                         else {"rank": None}))
            names.append(keys.round(r, "members"))
            values.append(json.dumps([[e["addr"], e["id"], e.get("host")] for e in members]))
        # intact before done: a member's heartbeat parks on it from its first beat
        store.multi_set(names, values)
        store.compare_set(keys.round(r, "done"), "", outcome)

    # -- liveness

    def _beat(self, key, beats):
        """Show that we live: `key` takes a new value (ephemeral when the store has them)."""
        if self._ephemeral:
            self._store.set_ephemeral(key, str(beats))
        else:
            self._store.add(key, 1)

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
            if self._lost is None and self._watches_gone() and self._round is not None:
                try:   # our own key ends the thread's parked wait_gone (we leave this round anyway)
                    self._store.delete_key(self._keys.round(self._round, "hb/%d" % self._rank))
                except _store.StoreError as e:
                    log.debug("could not wake the heartbeat thread: %s", e)
            if thread is not threading.current_thread():
                thread.join(self._params.read_timeout)

    def _watches_gone(self):
        """Whether the store can park a wait for a key to vanish (``wait_gone``): then a death
        that closes the dead node's connection (or ends its etcd lease) is known at once."""
        store = self._store
        return (self._ephemeral and callable(getattr(store, "wait_gone", None))
                and getattr(store, "supports_gone", True))

    def _heartbeat(self, r, rank, world_size, stop):
        """Beat, watch the neighbour and learn that the round broke, until `stop` (see the docstring)."""
        try:
            if self._watches_gone():
                self._watch_beating(r, rank, world_size, stop)
            else:
                self._poll_beating(r, rank, world_size, stop)
        except _store.StoreConnectionError as e:
            if not stop.is_set():
                self._lost = e
                self._broken.set()
                log.warning("rendezvous store lost: %s", e)

    def _stall_limit(self):
        """A loop of the heartbeat that took longer than this was not on schedule (see _Silence)."""
        params = self._params
        return min(2 * params.heartbeat_interval, (params.heartbeat_interval + params.heartbeat_timeout) / 2)

    def _watch_beating(self, r, rank, world_size, stop):
        """The heartbeat over a store with ``wait_gone``: one parked request per interval (``beat``)
        that sets our key and waits on the neighbour's key, the round's ``intact`` key and our own,
        so the neighbour's death, a broken round or ``_stop_heartbeat`` wake it at once. The broken
        counter is read only when woken; the neighbour's value comes back with each timeout."""
        store, keys, params = self._store, self._keys, self._params
        broken_flag = self._broken
        mine = keys.round(r, "hb/%d" % rank)
        neighbour = (rank + 1) % world_size if world_size > 1 else None
        their = keys.round(r, "hb/%d" % neighbour) if neighbour is not None else None
        broken, intact = keys.round(r, "broken"), keys.round(r, "intact")
        silence = _Silence(params.heartbeat_timeout, self._stall_limit())
        beats = 1
        self._beat(mine, beats)             # at once, then wait for the neighbour's first beat
        seen = None
        if their is not None:
            try:
                store.wait([their], params.heartbeat_interval)
                seen = _NO_BEAT             # it existed: from now on, missing means vanished
            except _store.StoreTimeout:
                pass
        # the first sleep ends at a random point of the interval: a large round's beats spread out
        pause = random.uniform(0, min(params.heartbeat_interval, params.heartbeat_timeout / 4))
        while not stop.is_set():
            try:
                watched = their if seen is not None else None
                beats += 1
                gone, value = self._beat_watching(mine, beats, [intact, mine] + ([watched] if watched else []),
                                                  pause, watched)
                pause = params.heartbeat_interval
                if stop.is_set():
                    return
                if gone:
                    if store.add(broken, 0) > 0:
                        log.info("round %d broken: %s; waiting for a new round", r, self._why(r))
                        broken_flag.set()
                        return
                    if watched is not None and self._peek(their) is None:
                        # dead, or it finished and left: then watch the next one
                        past = self._watch_past(r, rank, neighbour, world_size,
                                                "is gone (its store connection closed)", broken_flag)
                        if past is None:
                            return
                        neighbour, their, seen = past
                        silence = _Silence(params.heartbeat_timeout, self._stall_limit())
                        continue
                    stop.wait(params.heartbeat_interval)    # woken, yet nothing is gone: never spin
                    continue
                if their is None:
                    continue
                if watched is None:
                    value = self._peek(their)       # None until its first beat: silence counts
                silent = silence.observe(value)
                if seen is None and value is not None:
                    seen = value
                if silent is not None:
                    past = self._watch_past(r, rank, neighbour, world_size, "silent for %.0f s" % silent,
                                            broken_flag)
                    if past is None:
                        return
                    neighbour, their, seen = past
                    silence = _Silence(params.heartbeat_timeout, self._stall_limit())
            except _store.StoreConnectionError:
                raise
            except _store.StoreError as e:
                if stop.is_set():
                    return
                log.warning("heartbeat of round %d failed: %s", r, e)
                stop.wait(params.heartbeat_interval)

    def _beat_watching(self, key, beats, watch, timeout, their):
        """Beat at `key`, then wait up to `timeout` for a key of `watch` to vanish. Returns (True,
        None) when one did, else (False, the value of `their`)."""
        store = self._store
        if getattr(store, "supports_beat", False) and callable(getattr(store, "beat", None)):
            values = store.beat(key, str(beats), watch, timeout)
            if values is None:
                return True, None
            return False, values[-1] if their is not None else None
        store.set_ephemeral(key, str(beats))
        try:
            store.wait_gone(watch, timeout)
            return True, None
        except _store.StoreTimeout:
            pass
        if their is None:
            return False, None
        value = self._peek(their)
        return value is None, value

    def _poll_beating(self, r, rank, world_size, stop):
        """The heartbeat over a store without ``wait_gone``: beat, peek at the neighbour and read the
        broken counter, every heartbeat_interval."""
        store, keys, params = self._store, self._keys, self._params
        broken_flag = self._broken
        mine = keys.round(r, "hb/%d" % rank)
        neighbour = (rank + 1) % world_size if world_size > 1 else None
        their = keys.round(r, "hb/%d" % neighbour) if neighbour is not None else None
        broken = keys.round(r, "broken")
        silence = _Silence(params.heartbeat_timeout, self._stall_limit())
        beats, seen = 0, None
        # the first beat at a random point of the interval spreads a large round's beats over time
        if stop.wait(random.uniform(0, min(params.heartbeat_interval, params.heartbeat_timeout / 4))):
            return
        while True:
            try:
                beats += 1
                self._beat(mine, beats)
                if their is not None and not broken_flag.is_set():
                    value = self._peek(their)
                    if stop.is_set():
                        return
                    why = None
                    if value is None and seen is not None:
                        why = "is gone (its store connection closed)"
                    else:
                        seen = value if value is not None else seen
                        silent = silence.observe(value)
                        if silent is not None:
                            why = "silent for %.0f s" % silent
                    if why is not None:   # dead, or it finished and left: then watch the next one
                        past = self._watch_past(r, rank, neighbour, world_size, why, broken_flag)
                        if past is not None:
                            neighbour, their, seen = past
                            silence = _Silence(params.heartbeat_timeout, self._stall_limit())
                if not broken_flag.is_set() and store.add(broken, 0) > 0:
                    log.info("round %d broken: %s; waiting for a new round", r, self._why(r))
                    broken_flag.set()
            except _store.StoreConnectionError:
                raise
            except _store.StoreError as e:
                if stop.is_set():
                    return
                log.warning("heartbeat of round %d failed: %s", r, e)
            if stop.wait(params.heartbeat_interval):
                return

    def _watch_past(self, r, rank, neighbour, world_size, why, flag):
        """The member we watch (`neighbour`) vanished or went silent (`why`). When it said
        finished(), watch the next member of the ring that has not: returns (its rank, its heartbeat
        key, its beat now), or (None, None, None) when every other member finished. Otherwise, or
        when the next one's key is gone too (every member has beaten long before anyone
        finishes), that member is dead: the round is marked broken, and None returned."""
        after = neighbour
        while after != rank and self._store.check([self._keys.round(r, "finished/%d" % after)]):
            after = (after + 1) % world_size
        if after == rank:
            return None, None, None
        value = None
        if after != neighbour:
            try:
                self._next_host = _LazyMembers(self._store, self._keys.round(r, "members")).load()[after][2]
            except (_store.StoreError, ValueError, IndexError, TypeError):
                self._next_host = None
            value = self._peek(self._keys.round(r, "hb/%d" % after))
            if value is not None:
                return after, self._keys.round(r, "hb/%d" % after), value
            why = "is gone (its store connection closed)"
        self._declare_dead(r, after, why, flag)
        return None

    def _peek(self, key):
        """The heartbeat value at `key`; None when an ephemeral key is missing (vanished)."""
        if self._ephemeral:
            # not check() then get(): a key vanishing in between would park the get for
            # read_timeout. A compare_set that expects a value no beat writes answers at once, with
            # the value, or with `expected` itself when the key is missing, and changes nothing
            value = self._store.compare_set(key, _NO_BEAT, _NO_BEAT)
            return None if value == _NO_BEAT else value
        return self._store.add(key, 0)

    def _peek_all(self, names):
        """The heartbeat values of `names` (one operation when every key exists and none can vanish)."""
        store = self._store
        if self._ephemeral:
            return tuple(self._peek(name) for name in names)
        if store.check(names):
            return tuple(store.multi_get(names))
        return tuple(self._peek(name) if store.check([name]) else None for name in names)

    def _why(self, r):
        try:
            key = self._keys.round(r, "broken_why")
            return self._store.get(key).decode("utf-8") if self._store.check([key]) else "unknown"
        except _store.StoreError:
            return "unknown"

    def _declare_dead(self, r, rank, why, flag):
        """The member we watch (rank `rank`) is dead: `why` says how we know ("silent for 15 s")."""
        what = "node %s (rank %d) %s" % (self._next_host or "?", rank, why)
        log.warning("round %d broken: %s; waiting for a new round", r, what)
        self._mark_broken(r, what, flag)

    def _mark_broken(self, r, why, flag=None):
        store, keys = self._store, self._keys
        store.set(keys.round(r, "broken_why"), why)
        store.add(keys.round(r, "broken"), 1)
        store.set(keys.round(r + 1, "gate"), "1")      # the survivors may form the next round
        store.delete_key(keys.round(r, "intact"))       # wakes every member's parked wait_gone
        (flag or self._broken).set()

    def _leave_round(self, why):
        try:
            self._mark_broken(self._round, why)
        except _store.StoreError as e:
            log.debug("could not mark round %s broken: %s", self._round, e)

    def round_broken(self):
        """True once a member of the current round died or left, or the store was lost (no store I/O)."""
        return self._broken.is_set()

    def broken_reason(self):
        """Why the current round is broken (a member died or left), None while it is whole. Reads the
        store, unlike round_broken(): other members may know before this node's heartbeat does."""
        if self._round is None:
            return None
        if self._lost is not None:
            return "rendezvous store lost: %s" % self._lost
        key = self._keys.round(self._round, "broken")
        with self._mapped_errors():
            if not self._store.check([key]) or int(self._store.get(key)) <= 0:
                return None
        return self._why(self._round)

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

    def finished(self):
        """Tell the round's other members that this node's work is done (its workers succeeded):
        when it leaves (shutdown()), they neither see a lost member nor restart. Call it once this
        node will not take part in a further round."""
        if self._round is not None and self._lost is None:
            with self._mapped_errors():
                self._store.set(self._keys.round(self._round, "finished/%d" % self._rank), "1")
            self._finished = self._round

    def shutdown(self):
        """Leave the run: tell the round's other members (that the round is broken, unless
        finished() said this node is done) and stop heartbeats. Returns True."""
        if self._beat_stop is not None:
            self._beat_stop.set()   # our heartbeat thread must not narrate our own leaving as a break
        if self._round is not None and self._lost is None and self._finished != self._round:
            self._leave_round("node %s (rank %d) left" % (self.host_name, self._rank))
        self._stop_heartbeat()
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


class _Narrator:
    """Says what a wait waits for, at a human pace: once the wait has lasted FIRST seconds, then
    every GAP seconds, the gap growing by half each time up to MOST; never two lines within a
    second. ``until()``: seconds to the next line (cap a blocking wait with it), ``due()``,
    ``say(text)`` logs it (INFO, this module's logger)."""

    FIRST, GAP, MOST = 2.0, 10.0, 60.0

    def __init__(self):
        self.next = time.monotonic() + self.FIRST
        self.gap = self.GAP

    def until(self):
        return max(0.0, self.next - time.monotonic())

    def due(self):
        return time.monotonic() >= self.next

    def say(self, text):
        log.info("%s", text)
        self.next = time.monotonic() + max(1.0, self.gap)
        self.gap = min(self.gap * 1.5, self.MOST)


class _Silence:
    """How long a watched value has stayed the same, counted only over time the watcher ran.

    ``observe(value)`` after each look: returns the silence in seconds once the value has not
    changed for longer than `timeout`, else None. A look that came more than `stall` seconds after
    the previous one means the watcher itself stood still (SIGSTOP, a stalled VM) or the store did
    not answer; the count then starts again, so a node never blames a peer for its own silence.
    """

    def __init__(self, timeout, stall):
        self.timeout, self.stall = timeout, stall
        self.seen, self.changed, self.last = None, time.monotonic(), time.monotonic()

    def observe(self, value):
        now = time.monotonic()
        if now - self.last > self.stall:
            self.changed = now
        self.last = now
        if value != self.seen:
            self.seen, self.changed = value, now
            return None
        silent = now - self.changed
        return silent if silent > self.timeout else None


class _AllSilent:
    """Callable: True once the values read from `names` have not changed for `timeout` seconds
    (counted as _Silence counts)."""

    def __init__(self, names, peek, timeout, stall):
        self.names, self.peek = names, peek
        self.silence = _Silence(timeout, stall)
        self.fired = False

    def __call__(self):
        if self.silence.observe(self.peek(self.names)) is not None:
            self.fired = True
        return self.fired


class _Joiners:
    """The closer's watch on the nodes waiting in its round: which of them are known to be dead.

    A waiter beats its slot's ``alive`` key every heartbeat_interval while it waits. A joiner is
    dead when its key kept one value (or stayed missing) for heartbeat_timeout by our own clock
    while we waited, or when its ephemeral key is missing although it must exist: we saw it
    earlier, or the round is not the first, where joiners write the key before their record (and
    we read the record before looking). In the first round, where nodes usually arrive together
    and the round closes as soon as they have, writing it up front would cost every node one
    more store operation for little; a first-round joiner that dies before its first beat is
    caught only by its silence. A joiner we never watched is never suspected of silence, so a
    closer that did not wait closes as soon as before (in a later round, after one ``check``).
    """

    def __init__(self, handler, r, mine):
        self.handler, self.r, self.mine = handler, r, mine
        self.seen = {}          # slot -> (value of its alive key, when we first read that value)

    def _name(self, slot):
        return self.handler._keys.round(self.r, "alive/%d" % slot)

    def watch(self):
        """One look, while the closer waits, at every joiner's alive key."""
        handler = self.handler
        joined = handler._store.add(handler._keys.round(self.r, "arrive"), 0) & _SLOT_MASK
        self._note([s for s in range(1, joined + 1) if s != self.mine])

    def _note(self, slots):
        values = self.handler._peek_all([self._name(s) for s in slots]) if slots else ()
        now = time.monotonic()
        for slot, value in zip(slots, values):
            first = self.seen.get(slot)
            if first is None or first[0] != value:
                self.seen[slot] = (value, now)

    def _silent(self, slot):
        first = self.seen.get(slot)
        return first is not None and time.monotonic() - first[1] > self.handler._params.heartbeat_timeout

    def dead(self, entries):
        """The slots of `entries` (records just read, with their "slot") whose joiner is dead."""
        handler = self.handler
        others = [e for e in entries if e["slot"] != self.mine]
        suspects = [e["slot"] for e in others if self._silent(e["slot"])]
        if suspects:
            self._note(suspects)            # a last chance to show life
        dead = {slot for slot in suspects if self._silent(slot)}
        if handler._ephemeral:
            written = [e["slot"] for e in others if e["slot"] not in dead
                       and (self.r > 0 or self.seen.get(e["slot"], (None,))[0] is not None)]
            names = [self._name(slot) for slot in written]
            if names and not handler._store.check(names):
                dead.update(slot for slot, name in zip(written, names) if not handler._store.check([name]))
        return dead


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


def describe_run(store, run_id, observe=0.0):
    """What the store says of run `run_id`, read without joining and without writing (only ``check``,
    ``get`` and ``multi_get``): a dict with ``closed``, ``round`` (the last round formed, or None),
    ``members`` (rank, addr, id, heartbeat age in seconds: how long ago its beat was seen to change
    while we watched for `observe` seconds, None when it did not, ``gone`` when its ephemeral key
    vanished), ``master``, ``broken`` (the reason, or None), ``waiting`` (records of the nodes waiting
    in the next round), ``rounds`` (every round formed: its number -> ``nodes``, its member
    count, and ``user_prefix``, the prefix of the keys its agents wrote), ``world`` (the member
    count of the last round) and ``settings`` (the job settings the run's nodes share, as recorded
    by its first node; empty when none were given)."""
    keys = _Keys(run_id)

    def read(names):
        """{name: bytes} of the names that exist (two operations when they all do)."""
        present = names if names and store.check(names) else [n for n in names if store.check([n])]
        return dict(zip(present, store.multi_get(present))) if present else {}

    first = read([keys.closed, keys.open, keys.job])
    info = {"run_id": run_id, "closed": keys.closed in first, "round": None, "members": [],
            "master": None, "broken": None, "waiting": [], "rounds": {}, "settings": {}}
    if keys.job in first:
        try:
            info["settings"] = json.loads(first[keys.job].decode("utf-8"))["settings"]
        except (ValueError, KeyError, TypeError):
            pass
    top = int(first.get(keys.open, b"0"))
    world = 0
    for r in range(top, max(-1, top - 1000), -1):
        done = read([keys.round(r, "done")]).get(keys.round(r, "done"))
        if done is not None and done.startswith(b"{"):
            outcome = json.loads(done.decode("utf-8"))
            nodes = outcome["world_size"] if "world_size" in outcome else len(outcome["members"])
            if info["round"] is None:
                info["round"], info["master"] = r, "%s:%s" % (outcome["master_addr"], outcome["master_port"])
                members = outcome.get("members")
                if members is None:   # the member list in a key of its own
                    members = json.loads(read([keys.round(r, "members")]).get(keys.round(r, "members"), b"[]"))
                info["members"] = [{"rank": i, "addr": m[0], "id": m[1], "host": m[2] if len(m) > 2 else None}
                                   for i, m in enumerate(members)]
                world = nodes
            info["rounds"][r] = {"nodes": nodes, "user_prefix": keys.round(r, "user")}
    r = info["round"]
    if r is not None:
        state = read([keys.round(r, "broken"), keys.round(r, "broken_why")])
        if int(state.get(keys.round(r, "broken"), b"0")) > 0:
            info["broken"] = state.get(keys.round(r, "broken_why"), b"unknown").decode("utf-8", "replace")
        _watch_beats(store, [keys.round(r, "hb/%d" % m["rank"]) for m in info["members"]], info["members"],
                     observe, read)
    nxt = max(top, 0 if r is None else r + 1)     # where joiners wait: the open round
    arrived = read([keys.round(nxt, "arrive"), keys.round(nxt, "done")])
    if keys.round(nxt, "done") not in arrived:
        joins = int(arrived.get(keys.round(nxt, "arrive"), b"0")) & _SLOT_MASK
        records = read([keys.round(nxt, "node/%d" % s) for s in range(1, joins + 1)])
        for name, data in sorted(records.items()):
            try:
                record = json.loads(data.decode("utf-8"))
            except ValueError:
                continue
            if "withdrawn" not in record:
                info["waiting"].append({"addr": record.get("addr"), "id": record.get("id"),
                                        "rejoin": bool(record.get("rejoin"))})
    info["world"] = world
    return info


def _watch_beats(store, names, members, observe, read):
    """Set each member's ``heartbeat_age``: watch its beat for up to `observe` seconds."""
    start = time.monotonic()
    seen = read(names)
    changed = {}
    while len(changed) < len(names):
        left = start + observe - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(0.1, left))
        now_values = read(names)
        for name in names:
            if name not in changed and now_values.get(name) != seen.get(name) and name in now_values:
                changed[name] = time.monotonic()
    end = time.monotonic()
    final = read(names)
    for name, member in zip(names, members):
        member["heartbeat"] = final.get(name, b"").decode("utf-8", "replace") or None
        if name in changed:
            member["heartbeat_age"] = round(end - changed[name], 1)
        elif name not in final and name in seen:
            member["heartbeat_age"] = "gone"
        else:
            member["heartbeat_age"] = None


# ------------------------------------------------------------------------------------- etcd backend
#
# EtcdStore: the store API over etcd's v3 HTTP/JSON gateway, standard library only.
#
# The rendezvous algorithm only needs an object with the store's methods; ``EtcdStore`` is that object
# for ``--rdzv-backend etcd``, so the rendezvous state lives in an existing, replicated etcd cluster
# instead of one node's TCPStore::
#
#     s = EtcdStore("http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379", prefix="job42")
#     s.add("joined", 1)                  # a transaction on the key's mod revision, retried on conflict
#     s.get("ready")                      # waits on a watch stream, never polls
#     s.set_ephemeral("alive/node3", "1") # bound to this client's lease: gone soon after we die
#
# How each operation maps onto etcd (keys and values travel base64 in JSON; int64s are strings)::
#
#     set, multi_set        POST /v3/kv/put, /v3/kv/txn (puts)
#     get, multi_get, wait  POST /v3/kv/txn (ranges) -> revision R; keys missing at R are watched with
#                           POST /v3/watch {create_request: key, start_revision: R+1} until they appear
#     add, append,          range -> compute -> POST /v3/kv/txn compare mod_revision == seen;
#     compare_set           a failed compare returns the fresh value and we go again
#     check, num_keys       POST /v3/kv/txn (count-only ranges)
#     delete_key            POST /v3/kv/deleterange
#     set_ephemeral         POST /v3/lease/grant once (ttl), then put with that lease; a daemon thread
#                           renews it every ttl/3 (POST /v3/lease/keepalive); close() revokes it
#
# Semantics are the store's (and torch's): keys ``str``, values ``str``/``bytes`` in, ``bytes`` out; a
# timeout raises ``StoreTimeout`` naming the keys and leaves the client usable; ``compare_set`` on a
# missing key with a non-empty ``expected`` returns ``expected`` and stores nothing. Every key lives
# under ``prefix/`` in etcd, so several jobs can share one cluster.
#
# Failover: the endpoints are members of one cluster. A request that cannot reach a member (refused,
# reset, no answer, "no leader") moves on to the next member, round robin; ``StoreConnectionError`` is
# raised only when every member kept failing until the timeout. Watches ask the member to drop them when
# it loses its leader, and resume elsewhere from the last revision seen, so no event is lost.
# A mutation whose answer was lost with its connection may or may not have been applied: ``add`` and
# ``append`` write, in the same transaction, a per-thread marker key outside the user's keys, and read
# it back to find out instead of guessing (a lost answer never double-counts).
#
# The gateway's path prefix is probed once: ``/v3`` (etcd 3.4+), else ``/v3beta`` (3.3), else
# ``/v3alpha`` (3.2). Host names are resolved once, when the store is created.

def _http_client():
    """http.client, imported on first use: it costs the launcher memory and time it rarely needs."""
    import http.client
    return http.client


ETCD_DEFAULT_PORT = 2379
ETCD_DEFAULT_LEASE_TTL = 10.0
_ETCD_API_PATHS = ("/v3", "/v3beta", "/v3alpha")
_ETCD_CONNECT_TIMEOUT = 3.0     # a member that does not accept within this is skipped for now
_ETCD_REQUEST_TIMEOUT = 5.0     # no answer by then: the member is cut off or stuck; ask another one
_ETCD_FIRST_TRY = 1.5           # ...but the first try gives up sooner: a request caught in a leader
                                # election hangs until etcd's own timeout, while the election itself
                                # takes about one election timeout (1 s by default); tries double
_ETCD_MAX_TXN_OPS = 128         # etcd's default --max-txn-ops
_ETCD_FAILOVER_CODES = (4, 14)  # gRPC DeadlineExceeded, Unavailable: try another member
_ETCD_NOT_FOUND = 5             # gRPC NotFound: e.g. "requested lease not found"
_ETCD_HIDDEN = b"\x00etcdstore/"  # our own bookkeeping keys under the prefix, never user keys


def _etcd_b64(data):
    return base64.b64encode(data).decode("ascii")


def _etcd_unb64(text):
    return base64.b64decode(text) if text else b""


def _etcd_range_end(prefix):
    """The smallest key after every key that starts with `prefix` (etcd's "prefix" range)."""
    data = bytearray(prefix)
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return b"\x00"  # empty prefix: the whole keyspace


def _etcd_value(value):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError("store values are str or bytes, got %s" % type(value).__name__)


def _etcd_keys(keys):
    if isinstance(keys, str):
        raise TypeError("pass a list of keys, not a single str")
    keys = list(keys)
    for key in keys:
        if not isinstance(key, str):
            raise TypeError("store keys are str, got %s" % type(key).__name__)
    return keys


def _etcd_describe(error):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _etcd_parse_endpoints(endpoints):
    """[(url, address, port)] from URLs or a comma-separated string; each name resolved once, here."""
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    members = []
    for raw in endpoints:
        if not raw.strip():
            continue
        hostport, host, port = _etcd_url(raw)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise _store.StoreConnectionError("cannot resolve etcd host %r: %s" % (host, e)) from e
        members.append(("http://%s" % hostport, infos[0][4][0], port))
    if not members:
        raise ValueError("no etcd endpoints given (expected http://host:port[,http://host:port...])")
    return members


class _EtcdUnreachable(Exception):
    """This member did not answer usefully: try the next one."""


class _EtcdAmbiguous(Exception):
    """The request was sent and its answer lost: it may or may not have been applied."""


class _EtcdMembers:
    """The cluster's members, which one we currently prefer, and the gateway's path prefix."""

    def __init__(self, members):
        self.members = members
        self.current = 0
        self.api = None
        self.lock = threading.Lock()

    def pick(self):
        index = self.current
        return index, self.members[index]

    def skip(self, index):
        """Member `index` failed: prefer the next one (unless someone moved on already)."""
        with self.lock:
            if self.current == index:
                self.current = (index + 1) % len(self.members)

    def urls(self):
        return ",".join(m[0] for m in self.members)


class _EtcdLink:
    """One keep-alive HTTP connection to the current member, moving to the next when it fails.

    Not thread-safe by itself: each user holds its own link or a lock around it.
    """

    def __init__(self, members):
        self.members = members
        self.conn = None
        self.conn_index = None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _connect(self, index, member, remaining):
        if self.conn is not None and self.conn_index == index and self.conn.sock is not None:
            return self.conn
        self.close()
        conn = _http_client().HTTPConnection(member[1], member[2], timeout=min(remaining, _ETCD_CONNECT_TIMEOUT))
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _store._keepalive(conn.sock)
        except OSError as e:
            conn.close()
            raise _EtcdUnreachable("cannot connect: %s" % _etcd_describe(e)) from None
        self.conn, self.conn_index = conn, index
        return conn

    def _post(self, index, member, path, body, remaining, idempotent, limit=_ETCD_REQUEST_TIMEOUT):
        """One attempt on one member: the decoded JSON answer, or _EtcdUnreachable/_EtcdAmbiguous."""
        conn = self._connect(index, member, remaining)
        try:
            conn.sock.settimeout(max(0.05, min(remaining, limit)))
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, _http_client().HTTPException) as e:
            self.close()
            why = "lost the connection: %s" % _etcd_describe(e)
            raise (_EtcdUnreachable(why) if idempotent else _EtcdAmbiguous(why)) from None
        if resp.status == 200:
            try:
                return json.loads(data.decode("utf-8"))
            except ValueError:
                raise _store.StoreError("etcd at %s sent malformed JSON: %r" % (member[0], data[:200])) from None
        if resp.status == 404 and not data.startswith(b"{"):
            return None  # no such gateway path: the caller probes another API version
        try:
            error = json.loads(data.decode("utf-8"))
            code, message = error.get("code"), error.get("message") or error.get("error")
        except (ValueError, AttributeError):
            code, message = None, data[:200].decode("utf-8", "replace")
        if code in _ETCD_FAILOVER_CODES or resp.status in (502, 503, 504):
            why = "HTTP %d: %s" % (resp.status, message)
            raise (_EtcdUnreachable(why) if idempotent else _EtcdAmbiguous(why))
        raise _EtcdError(code, "etcd at %s refused %s: %s" % (member[0], path, message))

    def call(self, path, payload, deadline, idempotent=True):
        """POST `payload` to the gateway's `path` (e.g. "/kv/range") on some member, failing over."""
        members = self.members
        body = json.dumps(payload).encode("utf-8")
        failures, delay, attempts, limit = {}, 0.05, 0, _ETCD_FIRST_TRY
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and attempts:
                raise _store.StoreConnectionError(
                    "no etcd member answered within the timeout (%s)"
                    % "; ".join("%s: %s" % item for item in failures.items()))
            index, member = members.pick()
            attempts += 1
            try:
                if members.api is None:
                    self._probe(index, member, max(remaining, 0.05))
                answer = self._post(index, member, members.api + path, body, max(remaining, 0.05), idempotent,
                                    limit)
                if answer is None:
                    raise _store.StoreError("etcd at %s has no JSON gateway path %s%s"
                                            % (member[0], members.api, path))
                return answer
            except _EtcdUnreachable as e:
                failures[member[0]] = str(e)
                members.skip(index)
                limit = min(limit * 2, _ETCD_REQUEST_TIMEOUT)
            except _EtcdAmbiguous as e:
                members.skip(index)
                raise _EtcdAmbiguous("%s: %s" % (member[0], e)) from None
            if attempts % len(members.members) == 0:  # every member failed once: back off a little
                pause = min(delay * random.uniform(0.5, 1.5), deadline - time.monotonic())
                if pause > 0:
                    time.sleep(pause)
                delay = min(delay * 2, 1.0)

    def _probe(self, index, member, remaining):
        """Find the gateway's path prefix once: etcd 3.4+ /v3, 3.3 /v3beta, 3.2 /v3alpha."""
        body = json.dumps({"key": _etcd_b64(_ETCD_HIDDEN + b"probe"), "count_only": True}).encode()
        for api in _ETCD_API_PATHS:
            if self._post(index, member, api + "/kv/range", body, remaining, True) is not None:
                with self.members.lock:
                    self.members.api = api
                log.debug("etcd at %s speaks the JSON gateway under %s", member[0], api)
                return
        raise _store.StoreConnectionError("%s does not serve etcd's v3 JSON gateway (tried %s)"
                                          % (member[0], ", ".join(_ETCD_API_PATHS)))


class _EtcdError(_store.StoreError):
    """etcd refused a request (bad argument, too large, lease not found...)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _EtcdStreamBroken(Exception):
    """A watch stream ended early; the caller reads the current state and watches again."""


class EtcdStore:
    """The store API (as ``store.TCPStore``) over an etcd cluster's v3 JSON gateway.

    `endpoints`: a list of ``http://host:port`` URLs or one comma-separated string (port defaults
    to 2379), all members of one cluster. `prefix`: every key lives under ``prefix/`` in etcd.
    `timeout`: how long blocking calls wait, and how long requests keep failing over before
    ``StoreConnectionError``. `lease_ttl`: seconds a ``set_ephemeral`` key outlives this client.
    Safe to share between threads.
    """

    def __init__(self, endpoints, prefix="", *, timeout=300.0, lease_ttl=None):
        self.timeout = _store._seconds(timeout)
        self.lease_ttl = ETCD_DEFAULT_LEASE_TTL if lease_ttl is None else _store._seconds(lease_ttl)
        if self.lease_ttl < 1:
            raise ValueError("lease_ttl must be at least 1 second, got %r" % (lease_ttl,))
        if not isinstance(prefix, str):
            raise TypeError("prefix is a str, got %s" % type(prefix).__name__)
        self.prefix = prefix
        self._base = (prefix + "/").encode("utf-8") if prefix and not prefix.endswith("/") else prefix.encode("utf-8")
        self._members = _EtcdMembers(_etcd_parse_endpoints(endpoints))
        self._link = _EtcdLink(self._members)
        self._link_lock = threading.Lock()
        self._markers = self._base + _ETCD_HIDDEN + b"op/" + uuid.uuid4().hex.encode() + b"/"
        self._marked = False
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._lease = None
        self._lease_lock = threading.Lock()
        self._keeper = None
        self._closed = threading.Event()
        self._call("/kv/range", {"key": _etcd_b64(self._base + _ETCD_HIDDEN + b"hello"), "count_only": True})

    @property
    def endpoints(self):
        return [m[0] for m in self._members.members]

    def __repr__(self):
        return "EtcdStore(%r, prefix=%r)" % (self._members.urls(), self.prefix)

    # -- plumbing

    def _k(self, key):
        if not isinstance(key, str):
            raise TypeError("store keys are str, got %s" % type(key).__name__)
        return self._base + key.encode("utf-8")

    def _call(self, path, payload, idempotent=True, deadline=None):
        if self._closed.is_set():
            raise _store.StoreConnectionError("this etcd store client is closed")
        if deadline is None:
            deadline = time.monotonic() + max(self.timeout, 1.0)
        with self._link_lock:
            return self._link.call(path, payload, deadline, idempotent)

    def _txn(self, compare, success, failure=(), idempotent=True, deadline=None):
        return self._call("/kv/txn", {"compare": list(compare), "success": list(success),
                                      "failure": list(failure)}, idempotent, deadline)

    def _read(self, ekeys, deadline=None):
        """(revision, {key: value}) for the keys that exist, read at one revision per 128 keys."""
        revision, found = None, {}
        for start in range(0, len(ekeys), _ETCD_MAX_TXN_OPS):
            chunk = ekeys[start:start + _ETCD_MAX_TXN_OPS]
            answer = self._txn((), [{"request_range": {"key": _etcd_b64(k)}} for k in chunk], deadline=deadline)
            rev = int(answer["header"]["revision"])
            revision = rev if revision is None else min(revision, rev)  # replaying from the oldest is safe
            for response in answer.get("responses", ()):
                for kv in response.get("response_range", {}).get("kvs", ()):
                    found[_etcd_unb64(kv["key"])] = _etcd_unb64(kv.get("value"))
        return revision, found

    def _read_one(self, ekey):
        """(value or None, mod_revision) of one key; mod_revision 0 when missing."""
        answer = self._call("/kv/range", {"key": _etcd_b64(ekey)})
        return self._kv_state(answer)

    @staticmethod
    def _kv_state(range_answer):
        kvs = range_answer.get("kvs") or ()
        if not kvs:
            return None, 0
        return _etcd_unb64(kvs[0].get("value")), int(kvs[0]["mod_revision"])

    def _describe_keys(self, keys):
        return ", ".join(repr(k) for k in keys)

    # -- blocking reads: a range, then a watch from the revision after it

    def _wait_for(self, keys, seconds):
        """{key: value} once every key exists, or StoreTimeout after `seconds`."""
        ekeys = [self._k(k) for k in keys]
        deadline = time.monotonic() + seconds
        delay = 0.05
        while True:
            revision, found = self._read(ekeys, deadline=max(deadline, time.monotonic() + 1.0))
            missing = [k for k in ekeys if k not in found]
            if not missing:
                return found
            states = dict.fromkeys(missing)
            try:
                self._watch(states, revision + 1, deadline, keys)
            except _EtcdStreamBroken as e:
                log.debug("etcd watch ended early (%s); reading again", e)
                pause = min(delay * random.uniform(0.5, 1.5), deadline - time.monotonic())
                if pause > 0:
                    time.sleep(pause)  # a stream refused at once must not spin
                delay = min(delay * 2, 1.0)
                continue
            found.update(states)
            return found

    def _watch(self, states, start_revision, deadline, keys, gone=False):
        """Follow the keys in `states` from `start_revision` until each holds a value (`gone`:
        until one of them is deleted)."""
        members = self._members
        index, member = members.pick()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._timed_out(keys)
        conn = _http_client().HTTPConnection(member[1], member[2], timeout=min(remaining, _ETCD_CONNECT_TIMEOUT))
        try:
            try:
                conn.connect()
                # a watch is silent until its event comes: let the kernel probe the member meanwhile,
                # so a cut link ends the stream in ~5 s and we resume on another member (no polling)
                _store._keepalive(conn.sock, idle=2, interval=1, count=3)
            except OSError as e:
                members.skip(index)
                raise _EtcdStreamBroken("%s: %s" % (member[0], _etcd_describe(e))) from None
            body = "".join(json.dumps({"create_request": {"key": _etcd_b64(k), "start_revision": str(start_revision)}})
                           for k in states).encode("utf-8")
            # hasleader: the member cancels the watch when it loses its leader, so a partitioned
            # member cannot keep us waiting on events it will never see
            headers = {"Content-Type": "application/json", "Grpc-Metadata-Hasleader": "true"}
            sock = conn.sock
            try:
                sock.settimeout(max(0.05, min(deadline - time.monotonic(), _ETCD_REQUEST_TIMEOUT)))
                conn.request("POST", members.api + "/watch", body, headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    members.skip(index)
                    raise _EtcdStreamBroken("%s: watch answered HTTP %d" % (member[0], resp.status))
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._timed_out(keys)
                    sock.settimeout(remaining)
                    line = resp.readline()
                    if not line:
                        members.skip(index)
                        raise _EtcdStreamBroken("%s closed the watch" % member[0])
                    if not line.strip():
                        continue
                    message = json.loads(line.decode("utf-8"))
                    result = message.get("result")
                    if result is None:
                        members.skip(index)
                        raise _EtcdStreamBroken("%s: %s" % (member[0], message.get("error", message)))
                    if result.get("canceled"):
                        members.skip(index)  # compacted past our revision, or the member lost its leader
                        raise _EtcdStreamBroken("%s canceled the watch: %s"
                                                % (member[0], result.get("cancel_reason", "no reason given")))
                    for event in result.get("events", ()):
                        kv = event.get("kv", {})
                        key = _etcd_unb64(kv.get("key"))
                        if key in states:
                            if gone and event.get("type") == "DELETE":
                                return
                            states[key] = None if event.get("type") == "DELETE" else _etcd_unb64(kv.get("value"))
                    if not gone and all(value is not None for value in states.values()):
                        return
            except _store.StoreTimeout:
                raise
            except socket.timeout:
                if deadline - time.monotonic() <= 0.01:
                    raise _store.StoreTimeout(self._timeout_text(keys)) from None
                members.skip(index)
                raise _EtcdStreamBroken("%s did not answer the watch" % member[0]) from None
            except (OSError, _http_client().HTTPException, ValueError) as e:
                members.skip(index)
                raise _EtcdStreamBroken("%s: %s" % (member[0], _etcd_describe(e))) from None
        finally:
            conn.close()

    def _timed_out(self, keys):
        raise _store.StoreTimeout(self._timeout_text(keys))

    def _timeout_text(self, keys):
        return ("timed out waiting for key(s) %s in etcd at %s"
                % (self._describe_keys(keys), self._members.urls()))

    # -- read-modify-write: transactions on the key's mod revision

    def _marker(self):
        """This thread's marker key and a fresh sequence number to write into it."""
        with self._seq_lock:
            self._seq += 1
            self._marked = True
            return self._markers + str(threading.get_ident()).encode(), str(self._seq).encode()

    def _applied(self, marker, seq):
        value, _ = self._read_one(marker)
        return value == seq

    def _update(self, key, change, mark):
        """Apply `change(current or None) -> new bytes` atomically; returns the new value.

        `change` may return None to leave the key alone (then the current value is returned).
        """
        ekey = self._k(key)
        current, mod = self._read_one(ekey)
        while True:
            new = change(current)
            if new is None:
                return current
            compare = [{"key": _etcd_b64(ekey), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod)}]
            success = [{"request_put": {"key": _etcd_b64(ekey), "value": _etcd_b64(new)}}]
            if mark:
                marker, seq = self._marker()
                success.append({"request_put": {"key": _etcd_b64(marker), "value": _etcd_b64(seq)}})
            failure = [{"request_range": {"key": _etcd_b64(ekey)}}]
            try:
                answer = self._txn(compare, success, failure, idempotent=not mark)
            except _EtcdAmbiguous as e:
                log.debug("etcd: answer to an update of %r lost (%s); checking whether it applied", key, e)
                if self._applied(marker, seq):
                    return new
                current, mod = self._read_one(ekey)
                continue
            if answer.get("succeeded"):
                return new
            responses = answer.get("responses") or [{}]
            current, mod = self._kv_state(responses[0].get("response_range", {}))

    # -- the API

    def set(self, key, value):
        self._call("/kv/put", {"key": _etcd_b64(self._k(key)), "value": _etcd_b64(_etcd_value(value))})

    def get(self, key):
        """The value of `key`, waiting up to the store timeout for it to exist."""
        return self._wait_for([key], self.timeout)[self._k(key)]

    def add(self, key, amount):
        """Add `amount` to the integer at `key` (missing counts as 0); returns the new value."""
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError("add takes an int, got %s" % type(amount).__name__)

        def change(current):
            try:
                value = amount + (int(current) if current is not None else 0)
            except ValueError:
                raise _store.StoreError("add: the value of key %r is not an integer: %r"
                                        % (key, current[:64])) from None
            return str(value).encode()
        if amount == 0:   # a poll (num_nodes_waiting, heartbeats): read, and write only to create the key
            current, _ = self._read_one(self._k(key))
            if current is not None:
                return int(change(current))
        return int(self._update(key, change, mark=True))

    def compare_set(self, key, expected, desired):
        """Set `desired` if the value is `expected` (or the key is missing and `expected` is empty);
        returns the value the key now has (`expected` itself for a missing key otherwise)."""
        expected, desired = _etcd_value(expected), _etcd_value(desired)
        outcome = []

        def change(current):
            if current is None and expected:
                outcome.append(expected)
                return None
            if current is None or current == expected:
                return desired
            return None
        # replaying after a lost answer is harmless: the second round sees `desired` and returns it
        result = self._update(key, change, mark=False)
        return outcome[0] if outcome else result

    def wait(self, keys, timeout=None):
        """Wait until every key exists; StoreTimeout names them if `timeout` passes first."""
        keys = _etcd_keys(keys)
        self._wait_for(keys, self.timeout if timeout is None else _store._seconds(timeout))

    def wait_gone(self, keys, timeout=None):
        """Wait until at least one of `keys` does not exist (deleted, or its lease ended: a dead
        client's ephemeral key goes about ``lease_ttl`` after it stopped renewing); StoreTimeout
        if `timeout` passes first. A range, then a watch for a DELETE from the revision after it."""
        keys = _etcd_keys(keys)
        ekeys = [self._k(k) for k in keys]
        deadline = time.monotonic() + (self.timeout if timeout is None else _store._seconds(timeout))
        delay = 0.05
        while True:
            revision, found = self._read(ekeys, deadline=max(deadline, time.monotonic() + 1.0))
            if len(found) < len(set(ekeys)):
                return
            try:
                self._watch(dict.fromkeys(ekeys), revision + 1, deadline, keys, gone=True)
                return
            except _EtcdStreamBroken as e:
                log.debug("etcd watch ended early (%s); reading again", e)
                pause = min(delay * random.uniform(0.5, 1.5), deadline - time.monotonic())
                if pause > 0:
                    time.sleep(pause)
                delay = min(delay * 2, 1.0)

    def check(self, keys):
        keys = _etcd_keys(keys)
        for start in range(0, len(keys), _ETCD_MAX_TXN_OPS):
            chunk = keys[start:start + _ETCD_MAX_TXN_OPS]
            answer = self._txn((), [{"request_range": {"key": _etcd_b64(self._k(k)), "count_only": True}}
                                    for k in chunk])
            for response in answer.get("responses", ()):
                if int(response.get("response_range", {}).get("count", 0)) == 0:
                    return False
        return True

    def delete_key(self, key):
        answer = self._call("/kv/deleterange", {"key": _etcd_b64(self._k(key))})
        return int(answer.get("deleted", 0)) > 0

    def num_keys(self):
        """The number of keys under this store's prefix (the whole keyspace when it is empty)."""
        hidden = self._base + _ETCD_HIDDEN
        answer = self._txn((), [
            {"request_range": {"key": _etcd_b64(self._base or b"\x00"),
                               "range_end": _etcd_b64(_etcd_range_end(self._base)), "count_only": True}},
            {"request_range": {"key": _etcd_b64(hidden), "range_end": _etcd_b64(_etcd_range_end(hidden)),
                               "count_only": True}}])
        total, ours = (int(r.get("response_range", {}).get("count", 0)) for r in answer["responses"])
        return total - ours

    def multi_get(self, keys):
        """The values of all `keys`, waiting up to the store timeout for every one to exist."""
        keys = _etcd_keys(keys)
        found = self._wait_for(keys, self.timeout)
        return [found[self._k(k)] for k in keys]

    def multi_set(self, keys, values):
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError("multi_set got %d keys and %d values" % (len(keys), len(values)))
        puts = [{"request_put": {"key": _etcd_b64(self._k(k)), "value": _etcd_b64(_etcd_value(v))}}
                for k, v in zip(keys, values)]
        for start in range(0, len(puts), _ETCD_MAX_TXN_OPS):
            self._txn((), puts[start:start + _ETCD_MAX_TXN_OPS])

    def append(self, key, value):
        value = _etcd_value(value)
        self._update(key, lambda current: (current or b"") + value, mark=True)

    def set_timeout(self, timeout):
        self.timeout = _store._seconds(timeout)

    # -- leases: keys that vanish when this client dies

    def set_ephemeral(self, key, value):
        """Set `key` under this client's lease: it disappears about `lease_ttl` seconds after this
        client stops renewing it (process killed, host cut off) or at once on close()."""
        payload = {"key": _etcd_b64(self._k(key)), "value": _etcd_b64(_etcd_value(value))}
        for _ in range(2):
            payload["lease"] = self._ensure_lease()
            try:
                self._call("/kv/put", payload)
                return
            except _EtcdError as e:
                if e.code != _ETCD_NOT_FOUND:
                    raise
                self._lease_lost(payload["lease"])  # expired while we were away: take a new one
        raise _store.StoreError("etcd kept losing this client's lease while setting %r" % key)

    def _ensure_lease(self):
        with self._lease_lock:
            if self._lease is None:
                answer = self._call("/lease/grant", {"TTL": str(int(round(self.lease_ttl)))})
                if answer.get("error"):
                    raise _store.StoreError("etcd refused a lease: %s" % answer["error"])
                self._lease = answer["ID"]
                log.debug("etcd lease %s granted (ttl %s s)", self._lease, answer.get("TTL"))
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=self._keep_alive, name="etcd-lease-keepalive", daemon=True)
                self._keeper.start()
            return self._lease

    def _lease_lost(self, lease):
        with self._lease_lock:
            if self._lease == lease:
                self._lease = None

    def _keep_alive(self):
        """Renew the lease every ttl/3 on a connection of its own, until close()."""
        link = _EtcdLink(self._members)
        interval = self.lease_ttl / 3.0
        try:
            while not self._closed.wait(interval):
                lease = self._lease
                if lease is None:
                    continue
                try:
                    answer = link.call("/lease/keepalive", {"ID": lease}, time.monotonic() + interval)
                except _EtcdAmbiguous:
                    continue  # a renewal is idempotent: the next one will do
                except _store.StoreError as e:
                    log.warning("etcd lease %s: renewal failed: %s", lease, e)
                    continue
                if int((answer.get("result") or {}).get("TTL", 0)) <= 0:
                    log.warning("etcd lease %s expired: this client's ephemeral keys are gone", lease)
                    self._lease_lost(lease)
        finally:
            link.close()

    def close(self):
        """Revoke the lease (its keys vanish now), drop our bookkeeping keys, close the connections."""
        if self._closed.is_set():
            return
        lease, self._lease = self._lease, None
        deadline = time.monotonic() + min(self.timeout, 5.0)
        with self._link_lock:
            try:
                if lease is not None:
                    try:
                        self._link.call("/lease/revoke", {"ID": lease}, deadline)
                    except _store.StoreError:  # etcd 3.3 serves revoke under /kv/lease/revoke
                        self._link.call("/kv/lease/revoke", {"ID": lease}, deadline)
                if self._marked:
                    self._link.call("/kv/deleterange", {"key": _etcd_b64(self._markers),
                                                        "range_end": _etcd_b64(_etcd_range_end(self._markers))},
                                    deadline)
            except (_store.StoreError, _EtcdAmbiguous) as e:
                log.debug("etcd store close: %s", e)
            finally:
                self._closed.set()
                self._link.close()
        keeper = self._keeper
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------- Backends

def _read_token(path):
    try:
        return _store._read_token_file(path)
    except OSError as e:
        raise ValueError("rdzv conf token_file=%r cannot be read: %s" % (path, e.strerror or e)) from None
    except ValueError:
        raise ValueError("rdzv conf token_file=%r is empty" % path) from None


def _is_local_host(host, local_addr):
    """Whether `host` names this machine: its names, or an address of one of its interfaces.

    An address is ours when a socket can bind to it. A name other than ours is looked up once, here
    at startup (the store client would look it up anyway), so that a fully qualified name or an
    alias of this machine also makes it the host.
    """
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", socket.gethostname()}
    if local_addr:
        names.add(local_addr)
    if host in names or host.startswith("127."):
        return True
    try:
        addresses = [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            return False   # the client's own lookup reports it
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    return any(_bindable(address) for address in addresses)


def _bindable(address):
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(address), 0))
        return True
    except OSError:
        return False


def _listen_address(host):
    """The one address to serve the store on when the endpoint names it as an IP address this
    machine has; None (every interface) for a host name: names are resolved by clients, and a
    name's address here may not be the one the other nodes reach (127.0.1.1 in /etc/hosts)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return host if _bindable(address) else None


def _serve_store(host, port, timeout, token):
    """The store's server, in this process, and a client of it. It listens on the endpoint's address
    when that is possible (see _listen_address), on every interface otherwise."""
    return _store.TCPStore(host, port, is_master=True, timeout=timeout, token=token, bind=_listen_address(host))


def _open_store(params, host, port, serve):
    """A TCPStore client of host:port; `serve` True/False/None (None: serve if we can bind)."""
    token = params.token if params.token is not None else (
        _read_token(params.token_file) if params.token_file else None)
    if serve or serve is None:
        try:
            tcp = _serve_store(host, port, params.join_timeout, token)
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
        try:
            store = EtcdStore(params.endpoints, timeout=params.join_timeout,
                               lease_ttl=max(1.0, params.heartbeat_timeout))
        except _store.StoreError as e:
            raise RendezvousConnectionError("cannot reach etcd at %s: %s" % (", ".join(params.endpoints), e)) from e
        store.set_timeout(params.read_timeout)
        return RendezvousHandler(store, params, hosts_store=False)
    raise ValueError("rdzv backend %r is unknown" % params.backend)


def open_run_store(params, timeout=10.0):
    """A client of the run's store that never serves it: for reading a run from outside
    (``describe_run``), with the token of ``params.token_file``."""
    if params.backend == "etcd":
        try:
            return EtcdStore(params.endpoints, timeout=timeout)
        except _store.StoreError as e:
            raise RendezvousConnectionError("cannot reach etcd at %s: %s" % (", ".join(params.endpoints), e)) from e
    token = _read_token(params.token_file) if params.token_file else None
    try:
        return _store.TCPStore(params.host, params.port, timeout=timeout, token=token)
    except _store.StoreAuthError as e:
        raise RendezvousError(str(e)) from e
    except _store.StoreError as e:
        raise RendezvousConnectionError(str(e)) from e
