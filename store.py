#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""A TCP key-value store for thousands of clients that block on keys.

Standard library only; copy this one file anywhere. It is the bottom layer of elasticrun
(``store`` <- ``rendezvous`` <- ``elastic``) and speaks the API of torch's ``TCPStore``.

Usage::

    from store import TCPStore
    server = TCPStore("127.0.0.1", 0, is_master=True)   # hosts the server in-process
    client = TCPStore("127.0.0.1", server.port)
    client.add("joined", 1)                              # -> 1
    server.get("joined")                                 # -> b"1"
    client.get("late")                                   # waits until someone sets "late"

    $ python3 store.py --host 0.0.0.0 --port 29400 [--token-file F]
    listening on 0.0.0.0:29400

Semantics are torch's: keys are ``str``; values ``str`` or ``bytes`` in, ``bytes`` out; ``get`` and
``wait`` block until every key exists or the timeout passes (``StoreTimeout`` names the keys, and the
client stays connected and usable); ``add`` counts in decimal text; ``compare_set(key, expected,
desired)`` sets ``desired`` when the current value equals ``expected`` (or when the key is missing and
``expected`` is empty) and returns the value the key now has (``expected`` itself when the key is
missing and ``expected`` is not empty).

Queues, as in torch 2.x: ``queue_push(key, value)`` appends, ``queue_pop(key, block=True,
timeout=None)`` removes the oldest value (waiting for one, or ``QueueEmptyError`` at once with
``block=False``), ``queue_len(key)`` counts. A queue lives beside the keys, not among them: ``get``,
``num_keys`` and ``delete_key`` never see it, while ``check`` and ``wait`` take a non-empty queue for
its key existing (torch's rule). Each value goes to exactly one pop; pops that wait are served
oldest first, and every ``wait`` on the key wakes (torch's wakes one). ``clone()`` is another
client on its own connection; ``has_extended_api()`` is True; ``list_keys()`` names every key (not
the queues); ``barrier(key, world_size, timeout=None)`` returns once ``world_size`` callers came. Errors are ``RuntimeError``s, as
torch's are, and their words are torch's, our detail after them (``wait timeout after 100ms, keys:
/k``, ``The client socket has timed out after ...``, ``The server socket has failed to listen on any
local network address ...``).

The constructor takes torch's arguments, by position or keyword: ``TCPStore(host_name, port,
world_size=None, is_master=False, timeout=300, wait_for_workers=True, multi_tenant=False,
master_listen_fd=None, use_libuv=True)`` (``host`` is our name for ``host_name``; ``use_libuv`` is
accepted and ignored), and ours keyword-only: ``token``, ``bind``. With a ``world_size`` (and
``wait_for_workers``) every store counts itself in one key that ``num_keys`` counts and no key name
reaches (torch's), and the master waits until ``world_size`` have, or raises ``StoreTimeout``
("Timed out after 300 seconds waiting for clients. 3/4 clients joined."). ``multi_tenant`` masters
on one port of one process share one server, which stops when the last of them closes;
``master_listen_fd`` serves on a socket someone else bound; a master whose port is ``MASTER_PORT``
while ``TORCHELASTIC_USE_AGENT_STORE`` is true connects instead (the agent serves it: torch's rule).

Connecting retries until the timeout while the host name does not resolve (pods and DNS records
often appear after the job starts) or the server refuses or can't be reached, and a wait longer than
about 2 s is told on this module's logger (WARNING), then about every 10 s: "store gpu07:29400
refuses connections (retrying, 590 s left)", "store host gpu07 does not resolve yet (...)".

A client is one socket shared by all the threads that use it. When its connection ends (the server
went away, ``close()``, or a request interrupted by Ctrl-C while part of a frame may have been sent
or a reply lost), every later call raises ``StoreConnectionError`` saying which; a request
interrupted anywhere else leaves the client usable.

The server is one thread around ``selectors`` (epoll on Linux). A blocked ``get`` or ``wait`` is parked
on the server beside the keys it needs and answered by the ``set``/``add`` that completes it: nothing
polls, and an idle or waiting client costs one socket and a few hundred bytes, never a thread. We chose
selectors over asyncio because a request here is a few dictionary operations, and the event loop's own
overhead (futures, callbacks, transports) would be most of the cost; ``bench/bench_store.py`` measures it.

Wire protocol (version 1). Every message is a frame: a 4-byte big-endian length, then that many bytes.
Integers are big-endian; ``bytes`` fields are a u32 length then the data; ``keys`` is a u32 count then
that many ``bytes`` fields::

    client                                   server
      | -- hello   "EKVS" version:u8 -------->  |
      | <- welcome status:u8 version:u8 [features:u8 [offer] | challenge:32]
      | -- proof   HMAC-SHA256(token, challenge) nonce:32 ->   (only when status is PROOF)
      | <- verdict status:u8 [server-proof:32 features:u8 [offer]]  (READY, or REFUSED and it closes)
      | -- request op:u8 id:u32 args ------->  |  } any number, pipelined; replies may come out of
      | <- reply   status:u8 id:u32 result --  |  } order (a parked get answers later)

    op         args                                   result
    SET    1   key value                              -
    GET    2   timeout_ms:i64 keys                    one value per key (waits for all keys)
    ADD    3   key delta:i64                          new value:i64
    CAS    4   key expected desired                   value now stored
    WAIT   5   timeout_ms:i64 keys                    -
    CHECK  6   keys                                   all exist:u8
    DELETE 7   key                                    existed:u8
    COUNT  8   -                                      number of keys:i64
    MSET   9   count:u32 (key value)*                 -
    APPEND 10  key value                              -
    EPHEMERAL 11 key value                            -   (only when features has bit 0)
    QPUSH  13  key value                              -                    (only when features has bit 3)
    QPOP   14  timeout_ms:i64 key                     the oldest value     (bit 3; TIMEOUT: still empty)
    QLEN   15  key                                    queue length:i64     (bit 3)
    LIST   16  -                                      keys: every key name (bit 4)
    GONE   17  timeout_ms:i64 keys                    -                    (bit 5)
    BEAT   18  key value timeout_ms:i64 keys          gone:u8 [one value per key] (bit 6)

    reply status: OK 0 (result follows), TIMEOUT 1, ERROR 2 (a UTF-8 message follows)
    welcome/verdict status: READY 0, PROOF 1, VERSION 2 (mismatch), BUSY 3 (connection limit), REFUSED 4

``features`` follows READY (in the welcome, or in the verdict after a proof); bit 0 says the server
knows EPHEMERAL, bit 1 that an offer of the same-host socket follows (below), bit 3 that it knows
the queue ops, bit 4 that it knows LIST, bits 5 and 6 GONE and BEAT. A server older than EPHEMERAL sends no features byte (and
closes a connection that sends it an unknown op), so the client checks the bit and refuses
``set_ephemeral``, a queue op or ``list_keys`` with a clear ``StoreError`` instead of sending it. A
QPOP with a timeout is parked like a GET and answered by the QPUSH that hands it its value; with
``timeout_ms`` 0 it is answered at once.
EPHEMERAL is SET with the key bound to the sending connection: the server deletes the key when that
connection closes (``close()``, or the client process dies and its kernel closes the socket), unless
a later write by anyone (SET, ADD, CAS, APPEND, MSET) made it an ordinary key first, or another
connection's EPHEMERAL took it over. Liveness for free: a key that vanishes with its writer (as
etcd's leases do, and the rendezvous relies on that when it can).
GONE is WAIT turned around: it is answered once any one of its keys does not exist (at once when one
is missing already; otherwise when one is deleted, by DELETE or by its ephemeral owner's connection
closing), or with TIMEOUT. It lets a peer learn of a client's death the moment its connection
closes, with nothing polling (bit 5 of ``features``; ``wait_gone`` in the client). BEAT is a
heartbeat in one request: EPHEMERAL of its key and value, then GONE of its keys; it answers OK with
gone = 1 when one of them is deleted, or at its timeout with gone = 0 and their values (``beat`` in
the client, bit 6). A node that beats and watches a peer this way costs the server one request per
interval instead of three.

The same-host socket. A request over TCP through the loopback costs the kernel nearly twice what it
costs over a Unix socket, and on a busy host the kernel's share is most of a request's cost. So a
Linux server also listens on an abstract Unix socket with a random name, and offers it to each TCP
client on its own host (one that came over loopback, or from the address it reached us at) once the
handshake is done: ``offer`` is ``size:u8 name ticket:16``, the ticket random and good once, while
that TCP connection is open. The client connects to the name and sends ``"EKVL" version:u8 ticket``
as its hello; the server answers READY version features (then this is the client's connection, and
the server closes the TCP one) or REFUSED. A client that can't connect (another network namespace,
no Unix sockets) or is refused stays on TCP, as does every client of an older server or of
``StoreServer(local_socket=False)``. Nothing but a ticket gets in: the name is visible to every local
user, the ticket went only to a client that passed the TCP handshake (and its proof, when there is a
token).

``timeout_ms`` < 0 waits forever. Limits: keys up to ``MAX_KEY_SIZE`` bytes, values up to
``MAX_VALUE_SIZE``, frames up to ``MAX_FRAME_SIZE`` (256 bytes before the handshake completes). Every
single value fits in a frame, but several need not: the client refuses a ``multi_set``,
``compare_set`` or list of keys that would exceed the frame with ``ValueError`` before sending
anything, and the server answers a ``GET`` whose values would exceed it with ERROR (``StoreError``
in the client, which stays connected).
A connection has ``HANDSHAKE_TIMEOUT`` (10 s) from being accepted to finish its handshake, or the
server closes it: otherwise peers that connect and say nothing would hold connection slots for good
and lock real clients out. The clock starts at accept, and a client sends its hello as soon as it is
connected, so the time counted is mostly the server working through a burst of connections (16,000
clients connecting at once take it about a second) and a loaded client host scheduling the client;
10 s leaves a wide margin for both. Anything malformed (unknown op, lengths that don't add up,
oversized frame, a request before the handshake) closes that one connection, is logged in one line
(three a host in 10 s, the rest summed up in one line when the 10 s end; see ``_Logbook``), and
changes nothing stored: a request is fully parsed before it is applied. Values are never pickled.
One client costs a bounded amount: see the limits in ``StoreServer``'s docstring.

Authentication is optional, and mutual. A server given a token sends a random challenge and accepts
only the HMAC of it under the same token; the client sends its own random nonce with that proof, and
the server's READY carries its HMAC (under another label) of the nonce and the challenge, which the
client checks before it trusts anything the server says. So a client without the right token gets
``StoreAuthError`` and nothing else, and a client with a token refuses, with ``StoreAuthError``, a
server that cannot prove it knows the token: one that never asks for it (any program that took the
port first) or answers with a wrong proof. Proofs are compared with ``hmac.compare_digest``, in
constant time: a server must not tell an attacker, by how fast it refuses, how much of a guess was
right. (``hmac`` is imported when a token is first used, never at import time: hashlib's OpenSSL
costs a process ~4 MiB that a store without a token never needs.) A client older than the nonce
sends its proof alone and gets in as it used to, without checking the server. The token guards the
handshake, not the bytes after it (there is no encryption): on a network where someone can read and
rewrite traffic, run the store on a private network or a tunnel.

Without a token, anyone who can reach the port can read and write every key, and the launcher's
rendezvous keys decide a job's membership, restarts and outcome: give the store a token, or listen
only on an address that only the job's hosts reach (``StoreServer(host=...)``,
``TCPStore(..., is_master=True, bind=...)``).

Sections, in order: Errors and wire format, Server, Client, Command line.

Private helpers the upper modules (``rendezvous``, ``elastic``) may use, and no others: ``_seconds``
(a timeout given in seconds or as a ``timedelta``), ``_Pace`` (when a long wait should tell a person
about itself), ``_keepalive`` (TCP keepalive on a socket), ``_recv_exactly`` (n bytes or ``EOFError``),
``_read_token_file``. A helper two modules need lives here, in the lowest one.
"""

__version__ = "0.1.0"
__all__ = [
    "TCPStore", "PrefixStore", "StoreServer",
    "StoreError", "StoreTimeout", "StoreConnectionError", "StoreAuthError", "QueueEmptyError",
    "MAX_KEY_SIZE", "MAX_VALUE_SIZE", "MAX_FRAME_SIZE", "PROTOCOL_VERSION", "HANDSHAKE_TIMEOUT",
]

import collections
import errno
import heapq
import logging
import math
import os
import random
import select
import selectors
import socket
import struct
import sys
import threading
import time
import weakref

# Python 3.6 and 3.7 must reach this check, so this file keeps to syntax 3.6 can parse.
if sys.version_info < (3, 8):
    _OLD = "store needs Python 3.8 or newer, this is Python %s" % sys.version.split()[0]
    if __name__ == "__main__":   # the command line: one line and the status of a bad environment
        sys.stderr.write(_OLD + "\n")
        sys.exit(2)
    raise ImportError(_OLD)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Errors and wire format

PROTOCOL_VERSION = 1
MAX_KEY_SIZE = 64 * 1024
MAX_VALUE_SIZE = 256 * 1024 * 1024
MAX_FRAME_SIZE = MAX_VALUE_SIZE + 2 * MAX_KEY_SIZE + 64
DEFAULT_MAX_CONNECTIONS = 100000
DEFAULT_MAX_PARKED = 100000
DEFAULT_MAX_PARKED_PER_CONNECTION = 10000
HANDSHAKE_TIMEOUT = 10.0

_MAGIC = b"EKVS"
_HANDSHAKE_FRAME_LIMIT = 256
_CHALLENGE_SIZE = 32
_OUTPUT_LIMIT = 4 * 1024 * 1024   # replies queued for one connection before we stop reading its requests
_PARKED_FLOOR = 16                # parked requests every connection may hold, whatever the total
_TURN_REQUESTS = 256              # pipelined requests of one connection answered before the others get a turn

_SET, _GET, _ADD, _CAS, _WAIT, _CHECK, _DELETE, _COUNT, _MSET, _APPEND, _EPHEMERAL = range(1, 12)
_F_EPHEMERAL = 1                  # features bit: the server knows EPHEMERAL
_F_LOCAL = 2                      # features bit: an offer of the same-host socket follows
_QPUSH, _QPOP, _QLEN, _LIST = 13, 14, 15, 16
_GONE, _BEAT = 17, 18
_F_QUEUE = 8                      # features bit: the server knows QPUSH, QPOP and QLEN
_F_LIST = 16                      # features bit: the server knows LIST
_F_GONE = 32                      # features bit: the server knows GONE
_F_BEAT = 64                      # features bit: the server knows BEAT
_FEATURES = _F_EPHEMERAL | _F_QUEUE | _F_LIST | _F_GONE | _F_BEAT   # what this server sends after READY
_LOCAL_MAGIC = b"EKVL"            # the hello on the same-host socket
_TICKET_SIZE = 16                 # random bytes that let one same-host connection in, once
_OK, _TIMEOUT, _ERROR = 0, 1, 2
_READY, _PROOF, _VERSION, _BUSY, _REFUSED = 0, 1, 2, 3, 4

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_HEAD = struct.Struct(">IBI")      # frame length, op or status, request id
_HEAD_SIZE = _HEAD.size - 4        # bytes of op/status + id inside the frame
_OP_ID = struct.Struct(">BI")
_TIMEVAL = struct.Struct("@ll")    # struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO
_LONGEST = 365 * 86400.0           # the longest a client waits for a reply, however long its timeout
_ADD_REPLY = struct.Struct(">IBIq")


class StoreError(RuntimeError):
    """Root of this module's errors. A ``RuntimeError``, as torch's store errors are, so code written
    for torch (``except RuntimeError``) catches ours."""


class StoreTimeout(StoreError, TimeoutError):
    """A key did not appear, or the server did not answer, in time. The client stays usable."""


class StoreConnectionError(StoreError, ConnectionError):
    """The server could not be reached, refused us, or went away."""


class StoreAuthError(StoreError):
    """The server requires a token and ours was missing or wrong."""


class QueueEmptyError(StoreError):
    """``queue_pop(key, block=False)`` found the queue empty (torch's ``QueueEmptyError``)."""


class _Malformed(Exception):
    """A frame that breaks the protocol: its connection is closed."""


def _seconds(timeout):
    """Accept seconds or a datetime.timedelta, as torch does. Any length is fine, up to infinity:
    a timeout longer than the wire or the kernel can carry means waiting for good (see _wire_ms)."""
    try:
        seconds = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout)
    except OverflowError:   # an int too large for a float: longer than any wait
        seconds = float("inf")
    except (TypeError, ValueError):
        raise TypeError("a timeout is a number of seconds or a datetime.timedelta, got %r" % (timeout,)) from None
    if not seconds >= 0:   # also NaN, which no comparison would ever end
        raise ValueError("timeout must be a number of seconds >= 0, got %r" % (timeout,))
    return seconds


_FOREVER_MS = 2 ** 53   # timeouts from here on (about 285,000 years) are sent as "forever"


def _wire_ms(seconds):
    """A timeout as the wire's timeout_ms: milliseconds, or -1 (wait forever) for one it can't carry."""
    ms = seconds * 1000
    return int(ms) if ms < _FOREVER_MS else -1


def _key_bytes(key):
    if not isinstance(key, str):
        raise TypeError("store keys are str, got %s" % type(key).__name__)
    data = key.encode("utf-8")
    if len(data) > MAX_KEY_SIZE:
        raise ValueError("key of %d bytes exceeds the limit of %d bytes" % (len(data), MAX_KEY_SIZE))
    return data


def _value_bytes(value):
    if isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise TypeError("store values are str or bytes, got %s" % type(value).__name__)
    if len(data) > MAX_VALUE_SIZE:
        raise ValueError("value of %d bytes exceeds the limit of %d bytes" % (len(data), MAX_VALUE_SIZE))
    return data


def _field(data):
    return _U32.pack(len(data)) + data


_KEY_FIELDS = {}   # key -> its encoded field: clients name the same few keys over and over


def _key_field(key):
    field = _KEY_FIELDS.get(key) if key.__class__ is str else None
    if field is None:
        field = _field(_key_bytes(key))
        if len(_KEY_FIELDS) >= 4096:
            _KEY_FIELDS.clear()
        _KEY_FIELDS[key] = field
    return field


_ONE_KEY = _U32.pack(1)


def _keys_field(keys):
    field = _U32.pack(len(keys)) + b"".join(map(_key_field, keys))
    _check_request(len(field) + 8, "%d keys" % len(keys))   # room for a timeout_ms field
    return field


def _check_request(size, what):
    """A request whose arguments take `size` bytes fits in one frame, or ValueError."""
    if _HEAD_SIZE + size > MAX_FRAME_SIZE:
        raise ValueError("a request with %s takes %d bytes, over the frame limit of %d bytes (MAX_FRAME_SIZE); "
                         "split it" % (what, _HEAD_SIZE + size, MAX_FRAME_SIZE))


def _token_bytes(token):
    return token.encode("utf-8") if isinstance(token, str) else bytes(token)


def _proof(token, challenge):
    import hmac   # here, not at the top: hashlib's OpenSSL costs every launcher ~4 MiB it rarely needs
    return hmac.new(token, b"elasticrun-store-v1" + challenge, "sha256").digest()


def _server_proof(token, nonce, challenge):
    """What the server answers a client's nonce with: the token's HMAC over another label and other
    data than a client's proof (of another length, too), so no answer of one side serves the other."""
    import hmac
    return hmac.new(token, b"elasticrun-store-v1-server" + nonce + challenge, "sha256").digest()


def _same(a, b):
    import hmac   # both sides hold a token whenever this runs: _proof has imported hmac already
    return hmac.compare_digest(a, b)


def _check_port(port):
    """A TCP port number, or ValueError: the socket module would wrap 70000 around to 4464, or raise
    OverflowError."""
    if port.__class__ is not int and not isinstance(port, int):
        raise TypeError("port must be an int, got %s" % type(port).__name__)
    if not 0 <= port <= 65535:
        raise ValueError("port must be between 0 and 65535, got %d" % port)
    return port


def _read_token_file(path):
    with open(path, "rb") as f:
        token = f.read().strip()
    if not token:
        raise ValueError("token file %s is empty" % path)
    return token


# ------------------------------------------------------------------------------------------- Server

class _Reader:
    """Parses one request payload; any inconsistency raises _Malformed."""

    __slots__ = ("data", "pos")

    def __init__(self, data, pos):
        self.data, self.pos = data, pos

    def bytes(self, limit):
        data, pos = self.data, self.pos
        if pos + 4 > len(data):
            raise _Malformed("truncated length")
        (size,) = _U32.unpack_from(data, pos)
        end = pos + 4 + size
        if size > limit or end > len(data):
            raise _Malformed("field of %d bytes does not fit" % size)
        self.pos = end
        return data[pos + 4:end]

    def key(self):
        return self.bytes(MAX_KEY_SIZE)

    def value(self):
        return self.bytes(MAX_VALUE_SIZE)

    def i64(self):
        if self.pos + 8 > len(self.data):
            raise _Malformed("truncated integer")
        (value,) = _I64.unpack_from(self.data, self.pos)
        self.pos += 8
        return value

    def count(self):
        if self.pos + 4 > len(self.data):
            raise _Malformed("truncated count")
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        # each counted item takes at least 4 bytes, so a huge count in a short frame is a lie
        if value * 4 > len(self.data) - self.pos:
            raise _Malformed("count %d does not fit the frame" % value)
        return value

    def keys(self):
        return [self.key() for _ in range(self.count())]

    def end(self):
        if self.pos != len(self.data):
            raise _Malformed("%d trailing bytes" % (len(self.data) - self.pos))


class _Conn:
    __slots__ = ("sock", "peer", "rbuf", "wbuf", "state", "challenge", "waiters", "events", "closed", "owned",
                 "done", "local", "ticket", "paused", "owed")

    def __init__(self, sock, peer, local):
        self.sock, self.peer, self.local = sock, peer, local   # local: came in on the same-host socket
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.state = "hello"            # hello -> (proof ->) ready; or "closing" after a final answer
        self.challenge = None
        self.waiters = set()
        self.events = _READ
        self.closed = False
        self.owned = None               # keys set with EPHEMERAL: deleted when we close
        self.done = False               # past the handshake (or closed): its deadline no longer applies
        self.ticket = None              # the same-host ticket it was offered, until redeemed
        # Back-pressure. A client that sends requests without reading the replies would make us queue
        # replies without end (a thousand gets of a 1 MiB value take 1 GiB), so past _OUTPUT_LIMIT of
        # queued replies we stop: requests already read wait unparsed in rbuf, and the answers of
        # parked gets that come due wait in `owed` as (request id, the values), references to the
        # stored values rather than copies. `paused` says either holds something, to be taken up
        # once the client has read enough of its replies. A connection is also paused after
        # _TURN_REQUESTS pipelined requests in one turn of the loop, and resumed in the next, so
        # that a flood on one connection delays the others by one short turn, not by a whole read.
        self.paused = False
        self.owed = None


class _Waiter:
    """A parked GET or WAIT: answered when its last missing key appears, or at its deadline.
    A parked GONE (`gone` 1) or BEAT (`gone` 2): answered when any of its keys is deleted, or at
    its deadline."""

    __slots__ = ("conn", "rid", "keys", "missing", "want_values", "done", "gone")

    def __init__(self, conn, rid, keys, want_values, gone=0):
        self.conn, self.rid, self.keys, self.want_values = conn, rid, keys, want_values
        self.missing = 0
        self.done = False
        self.gone = gone


class _Logbook:
    """The server's warnings, rate-limited per peer host and written by a thread of their own.

    A peer that sends garbage as fast as it can would otherwise have us write a line per connection
    (tens of thousands a second), and a write to a stderr that is a full pipe nobody drains blocks:
    the serving thread must never wait on either. So each (host, kind) gets ``burst`` lines in full
    per ``window`` seconds; the rest are counted and summed up in one line when the window ends
    ("N more bad connections from H in the last T s"). Lines go to a bounded queue that a daemon
    thread, started at the first line, hands to ``logging``; when that thread is stuck in a write,
    lines beyond the queue's room are counted and the count is logged once it gets going again.
    """

    def __init__(self, window=10.0, burst=3, hosts=256, room=1000):
        self.window, self.burst, self.hosts, self.room = window, burst, hosts, room
        self._tally = {}            # (host, kind) -> [window start, lines written, lines held back, last]
        self._due = None            # when the earliest window with lines held back ends
        self._queue = collections.deque()
        self._dropped = 0
        self._cond = threading.Condition(threading.Lock())
        self._thread = None

    def warn(self, peer, kind, fmt, *args):
        """Log `fmt % args` unless `peer`'s host has had its share of `kind` lines in this window."""
        if not log.isEnabledFor(logging.WARNING):
            return
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        key = (host, kind)
        tally = self._tally
        entry = tally.get(key)
        now = time.monotonic()
        if entry is None:
            if len(tally) >= self.hosts:
                self.tick(now)   # forget windows that ended
                if len(tally) >= self.hosts:
                    key = ("other hosts", kind)
                    entry = tally.get(key)
            if entry is None:
                entry = tally[key] = [now, 0, 0, None]
        elif now - entry[0] >= self.window:   # a new window
            if entry[2]:
                self.tick(now)
            entry = tally[key] = [now, 0, 0, None]
        if entry[1] < self.burst:
            entry[1] += 1
            self._emit(fmt % args)
        else:
            entry[2] += 1
            entry[3] = (fmt, args)
            if self._due is None or entry[0] + self.window < self._due:
                self._due = entry[0] + self.window

    def next_due(self):
        """Seconds until a summary line is due, or None."""
        return None if self._due is None else max(0.0, self._due - time.monotonic())

    def tick(self, now=None, final=False):
        """Sum up the windows that ended (every window when `final`), and forget them."""
        now = time.monotonic() if now is None else now
        due = None
        for key, entry in list(self._tally.items()):
            start, _, held, last = entry
            if now - start < self.window and not final:
                if held and (due is None or start + self.window < due):
                    due = start + self.window
                continue
            del self._tally[key]
            if held:
                host, kind = key
                text = last[0] % last[1]
                self._emit("store: %d more %s from %s in the last %.3g s (the last: %s)"
                           % (held, kind, host, now - start, text[7:] if text.startswith("store: ") else text))
        self._due = due

    def _emit(self, line):
        with self._cond:
            if len(self._queue) >= self.room:
                self._dropped += 1
                return
            self._queue.append(line)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._write, name="store-log", daemon=True)
                self._thread.start()

    def _write(self):
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                line = self._queue.popleft()
                dropped, self._dropped = self._dropped, 0
            if line is None:
                return
            if dropped:
                log.warning("store: %d warnings were dropped: the log was not being written fast enough", dropped)
            log.warning("%s", line)

    def close(self, timeout=1.0):
        """Let the thread write what is queued, then end; wait up to `timeout` seconds for it, so
        that a program that exits next still prints the last summary (unless its stderr is stuck)."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._queue.append(None)
            self._cond.notify()
        if thread is not threading.current_thread():
            thread.join(timeout)


class _Popper(_Waiter):
    """A parked QPOP: handed the next value pushed to its queue (``keys`` holds its one key), or
    TIMEOUT at its deadline."""

    __slots__ = ()


_WAKE = "wake"                    # the poller's object for the server's own wake-up socket
_READ, _WRITE = 1, 4              # select.EPOLLIN, select.EPOLLOUT
_READABLE = _READ | 0x8 | 0x10    # with EPOLLERR and EPOLLHUP: recv then tells what happened


class _Poller:
    """epoll where there is one, called directly (the selectors wrapper costs a few microseconds a
    turn, which is a good part of a request); the selectors module elsewhere."""

    def __init__(self):
        self._objects = {}    # fd -> object handed back by poll()
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._selector = None if self._epoll else selectors.DefaultSelector()

    def register(self, sock, events, obj):
        fd = sock.fileno()
        self._objects[fd] = obj
        if self._epoll:
            self._epoll.register(fd, events)
        else:
            self._selector.register(fd, self._mask(events))

    def modify(self, sock, events):
        if self._epoll:
            self._epoll.modify(sock.fileno(), events)
        else:
            self._selector.modify(sock.fileno(), self._mask(events))

    def unregister(self, sock):
        fd = sock.fileno()
        if self._objects.pop(fd, _Poller) is _Poller:
            return
        if self._epoll:
            self._epoll.unregister(fd)
        else:
            self._selector.unregister(fd)

    def poll(self, timeout):
        """(fd, events) pairs; objects_by_fd() maps an fd to its object while it is registered."""
        if self._epoll:
            return self._epoll.poll(-1 if timeout is None else timeout)
        return [(key.fd, (_READ if mask & selectors.EVENT_READ else 0) | (_WRITE if mask & selectors.EVENT_WRITE else 0))
                for key, mask in self._selector.select(timeout)]

    def objects_by_fd(self):
        return self._objects

    def close(self):
        (self._epoll or self._selector).close()

    @staticmethod
    def _mask(events):
        return (selectors.EVENT_READ if events & _READ else 0) | (selectors.EVENT_WRITE if events & _WRITE else 0)


class StoreServer:
    """The store's server: one thread, one selector, every client parked rather than polled.

    ``start()`` runs it in a daemon thread, ``serve_forever()`` in the calling thread, ``stop()`` ends
    either from any thread. ``port=0`` picks a free port; read it back from ``.port``.
    ``local_socket=False`` keeps every client on TCP (see "The same-host socket" above).

    ``host`` is the address to listen on: ``"0.0.0.0"`` (every interface, the default, as torch's
    TCPStore does), or one address, such as the one the other nodes reach this host at, so that the
    store is not offered on networks that have no business with it.

    Limits, so that one client costs a bounded amount whatever it sends: at most ``max_connections``
    connections; at most ``max_parked_per_connection`` gets, waits and queue pops parked (waiting) per
    connection and ``max_parked`` in all, a request beyond them answered with an error that names
    the limit (every connection may park 16 whatever the total, so one client's flood never turns
    the others away); and a client that does not read its replies stops being read once 4 MiB of
    them are queued.
    """

    def __init__(self, host="0.0.0.0", port=0, *, token=None, max_connections=DEFAULT_MAX_CONNECTIONS,
                 backlog=65535, handshake_timeout=HANDSHAKE_TIMEOUT, local_socket=True,
                 max_parked=DEFAULT_MAX_PARKED, max_parked_per_connection=DEFAULT_MAX_PARKED_PER_CONNECTION,
                 listen_fd=None):
        for name, value in (("max_connections", max_connections), ("max_parked", max_parked),
                            ("max_parked_per_connection", max_parked_per_connection)):
            if not isinstance(value, int) or value < 1:
                raise ValueError("%s must be an int of at least 1, got %r" % (name, value))
        _check_port(port)
        if not isinstance(host, str):
            raise TypeError("host must be an address as a str, got %s" % type(host).__name__)
        self.host = host
        self.max_connections = max_connections
        self.max_parked = max_parked
        self.max_parked_per_connection = max_parked_per_connection
        self.handshake_timeout = _seconds(handshake_timeout)
        self._token = _token_bytes(token) if token else None
        self._raise_fd_limit(max_connections)
        if listen_fd is not None:
            # a socket someone else bound (torch's master_listen_fd): ours from here on, closed with us
            self._listener = socket.socket(fileno=listen_fd)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            if listen_fd is None:
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._listener.bind((host, port))
            self._listener.listen(backlog)
        except OSError as e:
            self._listener.close()
            # torch's DistNetworkError words first: scripts and torch's tests match them
            raise StoreConnectionError("The server socket has failed to listen on any local network address. "
                                       "host: %s, port: %s: %s" % (host, port, e.strerror or e)) from e
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._local = self._open_local(backlog) if local_socket else None
        self._local_name = self._local.getsockname() if self._local else None
        self._tickets = {}          # ticket -> the TCP connection it was offered to
        self._poller = _Poller()
        self._poller.register(self._listener, _READ, self._listener)
        if self._local:
            self._poller.register(self._local, _READ, self._local)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._poller.register(self._wake_r, _READ, _WAKE)
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)   # released to turn away clients at EMFILE
        # one receive buffer for every connection: recv(n) would malloc n bytes per call, and at
        # 256 KiB that is an mmap, an mremap and an munmap per request
        self._inbuf = bytearray(262144)
        self._inview = memoryview(self._inbuf)
        self._data = {}
        self._waiters = {}          # key -> {waiter: None}, an insertion-ordered set
        self._owners = {}           # ephemeral key -> the connection whose closing deletes it
        self._queues = {}           # key -> deque of values pushed and not yet popped; never empty
        self._poppers = {}          # key -> {parked QPOP: None}, the longest-waiting first
        self._gone = {}             # key -> {parked GONE waiter: None}
        self._deadlines = []        # heap of (deadline, seq, parked waiter or connection in its handshake)
        self._seq = 0
        self._conns = 0
        self._parked = 0            # parked waiters, over all connections
        self._dirty = []            # connections with replies queued during this turn
        self._backlog = []          # paused connections whose client has caught up (see _Conn.paused)
        self._logbook = _Logbook()
        self._warn = self._logbook.warn
        self._stopping = False
        self._life = threading.Lock()   # orders start, serve_forever and stop
        self._serving = None        # the thread that serves (or will: start() sets it)
        self._stopped = threading.Event()
        self._ops = {
            _SET: self._op_set, _GET: self._op_get, _ADD: self._op_add, _CAS: self._op_cas,
            _WAIT: self._op_wait, _CHECK: self._op_check, _DELETE: self._op_delete,
            _COUNT: self._op_count, _MSET: self._op_mset, _APPEND: self._op_append,
            _EPHEMERAL: self._op_ephemeral, _QPUSH: self._op_qpush, _QPOP: self._op_qpop,
            _QLEN: self._op_qlen, _LIST: self._op_list, _GONE: self._op_gone, _BEAT: self._op_beat,
        }

    @staticmethod
    def _open_local(backlog):
        """The same-host socket: an abstract Unix socket with a random name, or None where there are
        none (outside Linux) or it can't be had."""
        if not sys.platform.startswith("linux"):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(b"\0elasticrun-store-" + os.urandom(16).hex().encode())
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            log.debug("store: no same-host socket: %s", e)
            return None
        sock.setblocking(False)
        return sock

    @staticmethod
    def _raise_fd_limit(max_connections):
        try:
            import resource
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = max_connections + 256 if hard == resource.RLIM_INFINITY else min(hard, max_connections + 256)
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ImportError, ValueError, OSError) as e:  # not fatal: we turn clients away at EMFILE
            log.debug("could not raise the open-file limit: %s", e)

    # -- lifecycle

    def start(self):
        """Serve in a daemon thread; returns self."""
        thread = threading.Thread(target=self.serve_forever, name="store-server", daemon=True)
        with self._life:
            self._serving = thread   # from now on stop() waits for this thread to close everything
        thread.start()
        return self

    def stop(self, timeout=5.0):
        """Stop serving and close every connection (safe from any thread, and more than once).

        Returns once the listening socket is closed (or after `timeout` seconds of waiting for the
        serving thread); a server that never served is closed right here.
        """
        with self._life:
            self._stopping = True
            serving = self._serving
            if serving is None:
                if not self._stopped.is_set():
                    self._shutdown()
                return
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if serving is not threading.current_thread():
            self._stopped.wait(timeout)

    def serve_forever(self):
        with self._life:
            if self._stopped.is_set():   # stopped before it ever served
                return
            self._serving = threading.current_thread()
        poll, objects = self._poller.poll, self._poller.objects_by_fd()
        try:
            while not self._stopping:
                timeout = self._next_timeout() if self._deadlines else None
                if self._logbook._due is not None:
                    due = self._logbook.next_due()
                    if due == 0.0:
                        self._logbook.tick()
                    timeout = due if timeout is None else min(timeout, due)
                if self._backlog:
                    timeout = 0
                for fd, mask in poll(timeout):
                    conn = objects.get(fd)   # None: closed earlier in this turn
                    if conn.__class__ is _Conn:
                        if mask & _READABLE:
                            self._on_readable(conn)
                        if mask & _WRITE and not conn.closed:
                            self._flush(conn)
                    elif conn is _WAKE:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    elif conn is not None:   # a listening socket
                        self._accept(conn)
                if self._deadlines:
                    self._expire()
                if self._dirty:
                    dirty, self._dirty = self._dirty, []
                    for conn in dirty:
                        if not conn.closed:
                            self._flush(conn)
                if self._backlog:   # those that join it meanwhile wait for the next turn
                    backlog, self._backlog = self._backlog, []
                    for conn in backlog:
                        if conn.paused and not conn.closed:
                            self._catch_up(conn)
        finally:
            self._shutdown()

    def _shutdown(self):
        for conn in list(self._poller.objects_by_fd().values()):
            if isinstance(conn, _Conn):
                self._close(conn)
        for sock in (self._listener, self._local, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._poller.close()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
        self._logbook.tick(final=True)
        self._logbook.close()
        self._stopped.set()

    # -- connections

    def _accept(self, listener):
        local = listener is self._local
        while True:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._turn_away_one(listener)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            if local:
                peer = "a client on this host"   # until its ticket says which
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, peer, local)
            self._conns += 1
            self._poller.register(sock, _READ, conn)
            self._push_deadline(time.monotonic() + self.handshake_timeout, conn)

    def _turn_away_one(self, listener):
        """Out of descriptors: free the spare one to accept a client just to tell it why we can't."""
        if self._spare_fd is None:
            return
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            sock, _ = listener.accept()
            try:
                sock.setblocking(False)
                sock.recv(_HANDSHAKE_FRAME_LIMIT)          # read the hello so close sends FIN, not RST
            except OSError:
                pass
            try:
                sock.send(_U32.pack(2) + bytes([_BUSY, PROTOCOL_VERSION]))
            except OSError:
                pass
            sock.close()
        except OSError:
            pass
        self._warn("this host", "connections turned away", "store: out of file descriptors with %d connections; "
                   "turning clients away", self._conns)
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)

    def _close(self, conn):
        if conn.closed:
            return
        conn.closed = conn.done = True
        self._conns -= 1
        self._parked -= len(conn.waiters)
        for waiter in conn.waiters:
            waiter.done = True
            self._unpark(waiter)
        conn.waiters.clear()
        conn.owed = None
        if conn.owned:
            for key in conn.owned:
                del self._owners[key]
                self._data.pop(key, None)
                if key in self._gone:
                    self._vanished(key)
            conn.owned = None
        if conn.ticket is not None:
            del self._tickets[conn.ticket]
            conn.ticket = None
        self._poller.unregister(conn.sock)
        conn.sock.close()

    def _drop(self, conn, why):
        self._warn(conn.peer, "bad connections", "store: closing connection from %s: %s", _peer_text(conn.peer), why)
        self._close(conn)

    def _on_readable(self, conn):
        try:
            size = conn.sock.recv_into(self._inbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not size:
            self._close(conn)
            return
        if size >= 9 and not conn.rbuf and conn.state == "ready":
            length, op, rid = _HEAD.unpack_from(self._inbuf)
            if length + 4 == size:   # the usual case: one whole request
                handler = self._ops.get(op)
                try:
                    if handler is None:
                        raise _Malformed("unknown op %d" % op)
                    reply = handler(conn, rid, self._inview[4:size].tobytes())
                except _Malformed as e:
                    self._drop(conn, e)
                    return
                if reply is not None:
                    self._flush(conn, reply)
                return
        self._parse(conn, self._inview[:size].tobytes())

    def _parse(self, conn, chunk):
        """Answer the requests in what `conn` sent before (its rbuf) and `chunk`, until the replies
        queued for it pass _OUTPUT_LIMIT; keep the rest in rbuf."""
        if conn.rbuf:
            buf = conn.rbuf
            buf += chunk
        else:  # parse the chunk itself, keep only a partial frame's tail
            buf = chunk
        pos, size = 0, len(buf)
        ops = self._ops
        wbuf = conn.wbuf
        turn = _TURN_REQUESTS
        try:
            while size - pos >= 4 and not conn.closed:
                # the client is not reading: neither do we (see _Conn.paused); or it has had its turn
                turn -= 1
                if len(wbuf) > _OUTPUT_LIMIT or not turn:
                    self._pause(conn)
                    if not turn:
                        self._backlog.append(conn)
                    break
                (length,) = _U32.unpack_from(buf, pos)
                limit = MAX_FRAME_SIZE if conn.state == "ready" else _HANDSHAKE_FRAME_LIMIT
                if length > limit:
                    raise _Malformed("frame of %d bytes exceeds the limit of %d" % (length, limit))
                end = pos + 4 + length
                if end > size:
                    break
                payload = buf[pos + 4:end] if buf is chunk else bytes(buf[pos + 4:end])
                pos = end
                if conn.state != "ready":
                    self._handshake(conn, payload)
                elif len(payload) < _HEAD_SIZE:
                    raise _Malformed("request of %d bytes has no header" % len(payload))
                else:
                    op, rid = _OP_ID.unpack_from(payload)
                    handler = ops.get(op)
                    if handler is None:
                        raise _Malformed("unknown op %d" % op)
                    reply = handler(conn, rid, payload)
                    if reply is not None:
                        conn.wbuf += reply
        except _Malformed as e:
            self._drop(conn, e)
            return
        if conn.closed:
            return
        if buf is chunk:
            if pos < size:
                conn.rbuf += chunk[pos:]
        else:
            del buf[:pos]
        if conn.wbuf:
            self._flush(conn)

    def _pause(self, conn):
        """Stop reading `conn` until its client has taken enough of its replies."""
        conn.paused = True
        if conn.events != _WRITE:
            conn.events = _WRITE
            self._poller.modify(conn.sock, _WRITE)

    def _catch_up(self, conn):
        """The client of a paused connection has read enough: queue the answers owed to it, then
        parse the requests it sent meanwhile, each until the output limit is reached again."""
        conn.paused = False
        owed, wbuf = conn.owed, conn.wbuf
        while owed:
            if len(wbuf) > _OUTPUT_LIMIT:
                self._pause(conn)
                break
            rid, values = owed.popleft()
            wbuf += self._values_reply(rid, values)
        if not conn.paused and len(conn.rbuf) >= 4:
            self._parse(conn, b"")
        if conn.wbuf and not conn.closed:
            self._flush(conn)

    def _handshake(self, conn, payload):
        if conn.state == "hello" and conn.local:
            self._redeem(conn, payload)
        elif conn.state == "hello":
            if len(payload) != 5 or payload[:4] != _MAGIC:
                raise _Malformed("not a store client (bad hello)")
            if payload[4] != PROTOCOL_VERSION:
                self._warn(conn.peer, "clients of another version", "store: client %s speaks protocol %d, we speak %d",
                           _peer_text(conn.peer), payload[4], PROTOCOL_VERSION)
                self._final(conn, bytes([_VERSION, PROTOCOL_VERSION]))
            elif self._conns > self.max_connections:
                self._warn(conn.peer, "connections turned away", "store: turning away %s: %d connections reached "
                           "the limit", _peer_text(conn.peer), self.max_connections)
                self._final(conn, bytes([_BUSY, PROTOCOL_VERSION]))
            elif self._token is None:
                self._ready(conn, bytes([_READY, PROTOCOL_VERSION]))
            else:
                conn.state = "proof"
                conn.challenge = os.urandom(_CHALLENGE_SIZE)
                conn.wbuf += _U32.pack(2 + _CHALLENGE_SIZE) + bytes([_PROOF, PROTOCOL_VERSION]) + conn.challenge
        elif conn.state == "proof":
            # proof, then the client's nonce for us to prove ourselves; a client older than mutual
            # authentication sends the proof alone, and gets in without our proof, as it used to
            proof, nonce = payload[:_CHALLENGE_SIZE], payload[_CHALLENGE_SIZE:]
            if len(nonce) in (0, _CHALLENGE_SIZE) and _same(proof, _proof(self._token, conn.challenge)):
                ours = _server_proof(self._token, nonce, conn.challenge) if nonce else b""
                self._ready(conn, bytes([_READY]) + ours)
            else:
                self._warn(conn.peer, "failed authentications", "store: client %s failed authentication",
                           _peer_text(conn.peer))
                self._final(conn, bytes([_REFUSED]))
        else:
            raise _Malformed("data after the final answer")

    def _ready(self, conn, head):
        """Let a client in: `head`, the features byte, and for a TCP client on this host the offer of
        the same-host socket with a ticket for it."""
        conn.state = "ready"
        conn.done = True
        if self._local is None or conn.local or not self._on_this_host(conn):
            body = head + bytes([_FEATURES])
        else:
            conn.ticket = os.urandom(_TICKET_SIZE)
            self._tickets[conn.ticket] = conn
            name = self._local_name
            body = head + bytes([_FEATURES | _F_LOCAL, len(name)]) + name + conn.ticket
        conn.wbuf += _U32.pack(len(body)) + body

    @staticmethod
    def _on_this_host(conn):
        """Whether a TCP client runs on this host, in this network namespace: it came over loopback,
        or from the very address it reached us at. Others are never offered the same-host socket,
        which they could not reach."""
        there = conn.peer[0]
        if there.startswith(("127.", "::ffff:127.")) or there == "::1":
            return True
        try:
            return conn.sock.getsockname()[0] == there
        except OSError:
            return False

    def _redeem(self, conn, payload):
        """The hello on the same-host socket: a ticket offered to a TCP connection that is still open.

        The ticket is looked up in a dict, whose keyed hash never lets a guess be compared byte by
        byte with a real ticket, and a ticket works once. Redeeming it closes the TCP connection:
        the client moves here, and the connection count stays the same.
        """
        if len(payload) != 5 + _TICKET_SIZE or payload[:4] != _LOCAL_MAGIC:
            raise _Malformed("not a store client (bad hello on the same-host socket)")
        if payload[4] != PROTOCOL_VERSION:
            self._final(conn, bytes([_VERSION, PROTOCOL_VERSION]))
            return
        owner = self._tickets.pop(payload[5:], None)
        if owner is None:
            self._warn(conn.peer, "bad connections", "store: refused a same-host connection with an unknown ticket")
            self._final(conn, bytes([_REFUSED, PROTOCOL_VERSION]))
            return
        owner.ticket = None
        conn.peer = owner.peer
        self._close(owner)
        self._ready(conn, bytes([_READY, PROTOCOL_VERSION]))

    def _final(self, conn, payload):
        """Send a last answer, then close once it is out."""
        conn.wbuf += _U32.pack(len(payload)) + payload
        conn.state = "closing"
        self._flush(conn)

    def _flush(self, conn, reply=b""):
        """Send what is queued, then `reply`; a lone reply goes out without passing the buffer."""
        wbuf = conn.wbuf
        if reply and wbuf:   # earlier replies still queued: keep the order
            wbuf += reply
            reply = b""
        data = reply or wbuf
        if data:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent == len(data) and conn.events == _READ and conn.state == "ready" and not conn.paused:
                if data is wbuf:
                    wbuf.clear()   # the usual case: all out, nothing to change
                return
            if data is wbuf:
                del wbuf[:sent]
            else:
                wbuf += data[sent:]
        if not conn.wbuf and conn.state == "closing":
            self._close(conn)
            return
        # a client that doesn't read its answers stops being read until it catches up
        if not conn.wbuf:
            events = _READ
        elif len(conn.wbuf) > _OUTPUT_LIMIT:
            events = _WRITE
        else:
            events = _READ | _WRITE
        if conn.paused and events != _WRITE:   # caught up: what waited for it is next
            self._backlog.append(conn)
        if events != conn.events:
            conn.events = events
            self._poller.modify(conn.sock, events)

    # -- requests
    #
    # Each handler parses a request's payload (op, id, then its fields) in full before it changes
    # anything, and returns the reply frame, or None when the reply comes later (a parked get).

    def _error(self, rid, message):
        body = message.encode("utf-8")
        return _HEAD.pack(_HEAD_SIZE + len(body), _ERROR, rid) + body

    def _store(self, key, value):
        self._data[key] = value
        owners = self._owners
        if owners and key in owners:   # an ordinary write makes an ephemeral key an ordinary one
            self._disown(key)
        if key in self._waiters:
            self._wake(key)

    def _disown(self, key):
        owner = self._owners.pop(key)
        owner.owned.discard(key)

    # SET, ADD and a one-key GET are most of the traffic: they parse their few fields inline

    def _op_set(self, conn, rid, payload):
        size = len(payload)
        if size < 9:
            raise _Malformed("truncated set")
        (klen,) = _U32.unpack_from(payload, 5)
        vpos = 13 + klen
        if klen > MAX_KEY_SIZE or vpos > size:
            raise _Malformed("truncated set")
        (vlen,) = _U32.unpack_from(payload, vpos - 4)
        if vlen > MAX_VALUE_SIZE or vpos + vlen != size:
            raise _Malformed("set fields do not fill the frame")
        self._store(payload[9:vpos - 4], payload[vpos:])
        return _HEAD.pack(_HEAD_SIZE, _OK, rid)

    def _op_mset(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        pairs = [(r.key(), r.value()) for _ in range(r.count())]
        r.end()
        for key, value in pairs:
            self._store(key, value)
        return _HEAD.pack(_HEAD_SIZE, _OK, rid)

    def _op_append(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        key, value = r.key(), r.value()
        r.end()
        current = self._data.get(key, b"")
        if len(current) + len(value) > MAX_VALUE_SIZE:
            return self._error(rid, "append to %r would exceed the value limit of %d bytes"
                               % (_key_text(key), MAX_VALUE_SIZE))
        self._store(key, current + value)
        return _HEAD.pack(_HEAD_SIZE, _OK, rid)

    def _op_ephemeral(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        key, value = r.key(), r.value()
        r.end()
        self._own(conn, key, value)
        return _HEAD.pack(_HEAD_SIZE, _OK, rid)

    def _own(self, conn, key, value):
        self._store(key, value)
        if conn.owned is None:
            conn.owned = set()
        conn.owned.add(key)
        self._owners[key] = conn

    def _op_add(self, conn, rid, payload):
        fields = _ADD_FIELDS.get(len(payload)) or _add_fields(len(payload))
        klen, key, value = fields.unpack_from(payload, 5)
        if klen + 17 != len(payload):
            raise _Malformed("add fields do not fill the frame")
        current = self._data.get(key)
        if current is not None:
            try:
                value += int(current)
            except ValueError:
                return self._error(rid, "add: the value of key %r is not an integer: %r"
                                   % (_key_text(key), current[:64]))
            if not -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
                return self._error(rid, "add: key %r would overflow a 64-bit integer" % _key_text(key))
        self._store(key, b"%d" % value)
        return _ADD_REPLY.pack(_HEAD_SIZE + 8, _OK, rid, value)

    def _op_cas(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        key, expected, desired = r.key(), r.value(), r.value()
        r.end()
        current = self._data.get(key)
        if current is None and expected:  # torch answers a missing key with `expected` itself
            current = expected
        elif current is None or current == expected:
            self._store(key, desired)
            current = desired
        return _HEAD.pack(_HEAD_SIZE + 4 + len(current), _OK, rid) + _field(current)

    def _op_check(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        keys = r.keys()
        r.end()
        data, queues = self._data, self._queues   # a non-empty queue counts as its key existing, as in torch
        return _HEAD.pack(_HEAD_SIZE + 1, _OK, rid) + (b"\x01" if all(k in data or k in queues for k in keys)
                                                       else b"\x00")

    def _op_delete(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        key = r.key()
        r.end()
        if key in self._owners:
            self._disown(key)
        existed = self._data.pop(key, None) is not None
        if existed and key in self._gone:
            self._vanished(key)
        return _HEAD.pack(_HEAD_SIZE + 1, _OK, rid) + (b"\x01" if existed else b"\x00")

    def _op_count(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        r.end()
        return _ADD_REPLY.pack(_HEAD_SIZE + 8, _OK, rid, len(self._data))

    def _op_get(self, conn, rid, payload):
        # the common case, one key that exists, answered without parking
        value = self._data.get(_lone_key(payload))
        if value is not None:
            return _HEAD.pack(_HEAD_SIZE + 4 + len(value), _OK, rid) + _U32.pack(len(value)) + value
        return self._park(conn, rid, _Reader(payload, _HEAD_SIZE), want_values=True)

    def _op_wait(self, conn, rid, payload):
        # the common case at a barrier's end, one key that exists, answered without parking
        if _lone_key(payload) in self._data:
            return _HEAD.pack(_HEAD_SIZE, _OK, rid)
        return self._park(conn, rid, _Reader(payload, _HEAD_SIZE), want_values=False)

    def _op_gone(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        timeout_ms = r.i64()
        keys = r.keys()
        r.end()
        return self._park_gone(conn, rid, keys, timeout_ms, 1)

    def _op_beat(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        key, value = r.key(), r.value()
        timeout_ms = r.i64()
        keys = r.keys()
        r.end()
        self._own(conn, key, value)
        return self._park_gone(conn, rid, keys, timeout_ms, 2)

    def _gone_answer(self, waiter, gone):
        """The reply to a parked GONE (`gone`: a key was deleted) or BEAT (with the values if not)."""
        if waiter.gone == 1:
            return _HEAD.pack(_HEAD_SIZE, _OK if gone else _TIMEOUT, waiter.rid)
        data = self._data
        values = [data.get(k) for k in waiter.keys]
        if gone or None in values:
            return _HEAD.pack(_HEAD_SIZE + 1, _OK, waiter.rid) + b"\x01"
        body = b"\x00" + b"".join(map(_field, values))
        if _HEAD_SIZE + len(body) > MAX_FRAME_SIZE:
            return self._error(waiter.rid, "the values of these %d keys exceed the frame limit" % len(values))
        return _HEAD.pack(_HEAD_SIZE + len(body), _OK, waiter.rid) + body

    def _park_gone(self, conn, rid, keys, timeout_ms, kind):
        data = self._data
        waiter = _Waiter(conn, rid, keys, False, gone=kind)
        if not all(k in data for k in keys):
            return self._gone_answer(waiter, True)
        if timeout_ms == 0:
            return self._gone_answer(waiter, False)
        if not self._may_park(conn):
            return self._refuse_parking(conn, rid)
        for key in dict.fromkeys(keys):
            self._gone.setdefault(key, {})[waiter] = None
        conn.waiters.add(waiter)
        self._parked += 1
        if timeout_ms > 0:
            self._push_deadline(time.monotonic() + timeout_ms / 1000.0, waiter)
        return None

    def _vanished(self, key):
        """`key` was deleted: answer every GONE parked on it."""
        for waiter in self._gone.pop(key):
            if waiter.done:
                continue
            waiter.done = True
            self._unpark(waiter)
            conn = waiter.conn
            conn.waiters.discard(waiter)
            self._parked -= 1
            conn.wbuf += self._gone_answer(waiter, True)
            self._dirty.append(conn)

    def _park(self, conn, rid, r, want_values):
        timeout_ms = r.i64()
        keys = r.keys()
        r.end()
        waiter = _Waiter(conn, rid, keys, want_values)
        if not self._register(waiter):
            return self._answer(waiter)
        if timeout_ms == 0 or not self._may_park(conn):
            waiter.done = True
            self._unpark(waiter)
            if timeout_ms == 0:
                return _HEAD.pack(_HEAD_SIZE, _TIMEOUT, rid)
            return self._refuse_parking(conn, rid)
        conn.waiters.add(waiter)
        self._parked += 1
        if timeout_ms > 0:
            self._push_deadline(time.monotonic() + timeout_ms / 1000.0, waiter)
        return None

    def _may_park(self, conn):
        """Whether `conn` may park one more request (see the limits in the class docstring)."""
        held = len(conn.waiters)
        return held < _PARKED_FLOOR or held < self.max_parked_per_connection and self._parked < self.max_parked

    def _refuse_parking(self, conn, rid):
        if len(conn.waiters) >= self.max_parked_per_connection:
            why = ("this connection already has %d gets, waits and queue pops waiting, the most one connection "
                   "may have (max_parked_per_connection)" % len(conn.waiters))
        else:
            why = ("the store already holds %d gets, waits and queue pops waiting, the most it holds from all "
                   "clients (max_parked)" % self._parked)
        self._warn(conn.peer, "refused gets and waits", "store: refused a get or wait from %s: %s",
                   _peer_text(conn.peer), why)
        return self._error(rid, "the store refused to wait for the key(s): " + why)

    def _push_deadline(self, deadline, item):
        """Add a parked waiter's or a new connection's deadline.

        Entries that ended early (answered, closed) stay in the heap until they reach its top, which
        for a get that asked to wait a year is a year: so when most entries are dead, sweep them out.
        At most one live entry per parked waiter and per connection, so the heap stays within twice
        those plus a constant, at an amortized cost of O(1) a push.
        """
        heap = self._deadlines
        if len(heap) > 2 * (self._parked + self._conns) + 1024:
            heap[:] = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)
        self._seq += 1
        heapq.heappush(heap, (deadline, self._seq, item))

    def _register(self, waiter):
        """Park `waiter` on each of its missing keys; returns how many are missing. A WAIT takes a
        non-empty queue for its key existing (as torch's does); a GET wants values only."""
        data, waiters = self._data, self._waiters
        queues = () if waiter.want_values else self._queues
        missing = 0
        for key in dict.fromkeys(waiter.keys):   # a key named twice is still one key to wait for
            if key not in data and key not in queues:
                missing += 1
                waiters.setdefault(key, {})[waiter] = None
        waiter.missing = missing
        return missing

    def _unpark(self, waiter):
        if waiter.__class__ is _Popper:
            table = self._poppers
        else:
            table = self._gone if waiter.gone else self._waiters
        for key in waiter.keys:
            parked = table.get(key)
            if parked is not None:
                parked.pop(waiter, None)
                if not parked:
                    del table[key]

    def _wake(self, key):
        for waiter in self._waiters.pop(key):
            if waiter.done:
                continue
            waiter.missing -= 1
            if waiter.missing == 0:
                # a key it already counted may have been deleted since; park again if so
                self._unpark(waiter)
                if self._register(waiter) == 0:
                    waiter.done = True
                    waiter.conn.waiters.discard(waiter)
                    self._parked -= 1
                    self._deliver(waiter.conn, waiter.rid, self._values(waiter))

    def _deliver(self, conn, rid, values):
        """Queue the answer of a parked request that came due (`values` as _values_reply takes them):
        now, or owed while its client is not reading (see _Conn.paused)."""
        if conn.paused or len(conn.wbuf) > _OUTPUT_LIMIT:
            if conn.owed is None:
                conn.owed = collections.deque()
            conn.owed.append((rid, values))
            if not conn.paused:
                self._pause(conn)
        else:
            conn.wbuf += self._values_reply(rid, values)
        self._dirty.append(conn)

    def _values(self, waiter):
        """The values a get waits for (references, not copies), or None for a wait."""
        if waiter.want_values:
            data = self._data
            return [data[k] for k in waiter.keys]
        return None

    def _answer(self, waiter):
        return self._values_reply(waiter.rid, self._values(waiter))

    def _values_reply(self, rid, values):
        if values is None:
            return _HEAD.pack(_HEAD_SIZE, _OK, rid)
        size = _HEAD_SIZE + 4 * len(values) + sum(map(len, values))
        if size > MAX_FRAME_SIZE:   # each value fits, but not all of them in one reply
            return self._error(rid, "the values of these %d keys take %d bytes, over the frame "
                               "limit of %d bytes (MAX_FRAME_SIZE); get them in smaller groups"
                               % (len(values), size, MAX_FRAME_SIZE))
        return _HEAD.pack(size, _OK, rid) + b"".join(map(_field, values))

    # queues: beside the keys, not among them (num_keys, get and delete_key never see one)

    def _op_qpush(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        key, value = r.key(), r.value()
        r.end()
        poppers = self._poppers.get(key)
        if poppers:   # the longest-waiting pop takes the value straight away
            popper = next(iter(poppers))
            popper.done = True
            self._unpark(popper)
            popper.conn.waiters.discard(popper)
            self._parked -= 1
            self._deliver(popper.conn, popper.rid, [value])   # the reply of a one-key get: the value
        else:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = collections.deque()
            queue.append(value)
            if key in self._waiters:   # a WAIT on the key is answered by a non-empty queue
                self._wake(key)
        return _HEAD.pack(_HEAD_SIZE, _OK, rid)

    def _op_qpop(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        timeout_ms = r.i64()
        key = r.key()
        r.end()
        queue = self._queues.get(key)
        if queue:
            value = queue.popleft()
            if not queue:
                del self._queues[key]
            return _HEAD.pack(_HEAD_SIZE + 4 + len(value), _OK, rid) + _field(value)
        if timeout_ms == 0:
            return _HEAD.pack(_HEAD_SIZE, _TIMEOUT, rid)
        if not self._may_park(conn):
            return self._refuse_parking(conn, rid)
        popper = _Popper(conn, rid, [key], False)
        self._poppers.setdefault(key, {})[popper] = None
        conn.waiters.add(popper)
        self._parked += 1
        if timeout_ms > 0:
            self._push_deadline(time.monotonic() + timeout_ms / 1000.0, popper)
        return None

    def _op_list(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        r.end()
        keys = list(self._data)
        size = _HEAD_SIZE + 4 + 4 * len(keys) + sum(map(len, keys))
        if size > MAX_FRAME_SIZE:
            return self._error(rid, "the names of all %d keys take %d bytes, over the frame limit of %d bytes "
                               "(MAX_FRAME_SIZE)" % (len(keys), size, MAX_FRAME_SIZE))
        body = _U32.pack(len(keys)) + b"".join(map(_field, keys))
        return _HEAD.pack(_HEAD_SIZE + len(body), _OK, rid) + body

    def _op_qlen(self, conn, rid, payload):
        r = _Reader(payload, _HEAD_SIZE)
        key = r.key()
        r.end()
        return _ADD_REPLY.pack(_HEAD_SIZE + 8, _OK, rid, len(self._queues.get(key, ())))

    def _next_timeout(self):
        # capped: a client may ask to wait for centuries, which epoll's millisecond int can't hold
        return min(max(0.0, self._deadlines[0][0] - time.monotonic()), 3600.0)

    def _expire(self):
        now = time.monotonic()
        heap = self._deadlines
        while heap and (heap[0][2].done or heap[0][0] <= now):
            waiter = heapq.heappop(heap)[2]
            if waiter.done:
                continue
            if waiter.__class__ is _Conn:   # a connection still in its handshake: it holds a slot for nothing
                self._drop(waiter, "no handshake within %g s" % self.handshake_timeout)
                continue
            waiter.done = True
            self._unpark(waiter)
            waiter.conn.waiters.discard(waiter)
            self._parked -= 1
            waiter.conn.wbuf += (self._gone_answer(waiter, False) if waiter.gone
                                 else _HEAD.pack(_HEAD_SIZE, _TIMEOUT, waiter.rid))
            self._dirty.append(waiter.conn)


_ADD_FIELDS = {}   # size of an ADD payload -> the Struct of its klen, key and delta, for one unpack


def _add_fields(size):
    """An ADD payload is op, id, klen, key, delta: 17 bytes and the key."""
    if not 17 <= size <= 17 + MAX_KEY_SIZE:
        raise _Malformed("add of %d bytes cannot hold its fields" % size)
    if len(_ADD_FIELDS) >= 256:
        _ADD_FIELDS.clear()
    fields = _ADD_FIELDS[size] = struct.Struct(">I%dsq" % (size - 17))
    return fields


def _lone_key(payload):
    """The one key a GET or WAIT payload names, if it names exactly one in well-formed fields;
    else None, and the general parser takes the payload."""
    if len(payload) >= 21 and payload[13:17] == _ONE_KEY:
        (klen,) = _U32.unpack_from(payload, 17)
        if klen <= MAX_KEY_SIZE and 21 + klen == len(payload):
            return payload[21:]
    return None


def _peer_text(peer):
    return "%s:%s" % (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _key_text(key):
    return key.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------- Client

class _Unresolved(Exception):
    """The store's host name does not resolve (yet: a pod's name or a late DNS record may appear)."""


def _resolve(host, port):
    """The addresses of host:port. Called once per connection attempt, never in a tight loop: a
    lookup can stall for seconds."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise _Unresolved(e.strerror or str(e)) from e
    except UnicodeError as e:   # not a name at all ("a..b"): waiting will not fix it
        raise StoreConnectionError("the store host %r is not a valid host name: %s" % (host, e)) from e
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


class _Pace:
    """When a long wait tells a person about itself: first after `first` seconds, then at gaps that
    double up to `most` seconds; never a line per retry, never two within a second. The upper
    modules may pace their own waits with it."""

    def __init__(self, first=2.0, most=10.0, clock=time.monotonic):
        self._clock, self._most = clock, most
        self._gap = max(first, 1.0)
        self._next = clock() + first

    def due(self):
        """True when the next line is due (and then the one after is scheduled)."""
        now = self._clock()
        if now < self._next:
            return False
        self._gap = min(self._gap * 2, self._most)
        self._next = now + self._gap
        return True


def _keepalive(sock, idle=5, interval=2, count=5):
    """Notice a peer that vanished without closing (power loss, cut link): after about
    idle + interval * count seconds of silence (15 s by default) the kernel fails our reads."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class TCPStore:
    """A client of the store; ``is_master=True`` also hosts the server in this process.

    One socket per client, safe to share between threads: requests are pipelined with ids, and
    whichever waiting thread is reading hands the others their replies.

    ``bind`` (with ``is_master``): the address the server listens on, every interface by default as
    torch's does; give one address (that ``host`` reaches) to keep the store off other networks.
    The other arguments are torch's (see "The constructor" in the module docstring).
    """

    def __init__(self, host=None, port=None, world_size=None, is_master=False, timeout=300.0,
                 wait_for_workers=True, multi_tenant=False, master_listen_fd=None, use_libuv=True, *,
                 token=None, bind=None, host_name=None):
        if host_name is not None:   # torch's name for it
            if host is not None:
                raise TypeError("TCPStore: give host or host_name, not both")
            host = host_name
        if host is None or port is None:
            raise TypeError("TCPStore needs a host and a port")
        _check_port(port)
        if world_size is not None:
            if world_size.__class__ is not int and not isinstance(world_size, int):
                raise TypeError("TCPStore world size must be an int or None, got %r" % (world_size,))
            if world_size < 1:
                raise ValueError("TCPStore world size cannot be %d" % world_size)
        if is_master and _agent_store_at(port):
            is_master = False   # a worker under torchrun/elasticrun: the agent already serves this port
        self.timeout = timeout
        deadline = time.monotonic() + self.timeout
        self._server = None
        if is_master:
            if bind is None:
                bind = "::" if ":" in host else "0.0.0.0"
            self._server, shared = _host_server(bind, port, token, multi_tenant, master_listen_fd)
            port = self._server.port
            # a master dropped without close() stops its server and frees its port, as torch's does
            # (a shared one, once its last master is gone); the finalizer and the server thread hold
            # the server only, never this client
            self._stop_server = weakref.finalize(self, _release_server, self._server, shared)
            self._stop_server.atexit = False
        self.host, self.port = host, port
        self._token = _token_bytes(token) if token else None
        # one frame on the wire at a time. An RLock because it knows its owner: a request interrupted
        # just after acquiring it (Ctrl-C) can tell that it holds it and let go, which a Lock can't
        self._send_lock = threading.RLock()
        self._lock = threading.Lock()        # guards the three fields below
        self._reading = 0                    # the id of the thread reading replies off the socket, or 0
        self._waiting = {}                   # request id -> the lock its thread sleeps on, or None
        self._replies = {}                   # request id -> (status, body), read by another thread
        self._rid = 0
        self._rbuf = bytearray()
        self._features = 0                   # what the server said it knows (bits _F_*)
        self._gone = None                    # why the connection ended, for every later message
        self._sock = None
        try:
            self._sock = self._connect(deadline)
            if world_size is not None and wait_for_workers:
                self._join(world_size, deadline)
        except BaseException:
            if self._sock is not None:
                self._end("this client of the store at %s failed to start" % self._where())
            if self._server is not None:
                self._stop_server()
            raise

    def _join(self, world_size, deadline):
        """torch's world-size handshake: every store made with a world_size counts itself in one
        key (so ``num_keys`` counts it, as torch's does; as in torch, no key a caller can name reaches
        it), and the master waits until `world_size` have. The one whose count completes it wakes
        the master through a queue of the same name (queues are not keys), so nobody polls."""
        joined = _I64.unpack(self._call(_ADD, _INIT_FIELD + _I64.pack(1)))[0]
        if joined == world_size and self._server is None and self._features & _F_QUEUE:
            self._call(_QPUSH, _INIT_FIELD + _field(b""))
        if self._server is None or joined >= world_size:
            return
        gap = 2.0   # a person hears of a long wait after 2 s, then at gaps doubling up to 10 s
        while True:
            left = deadline - time.monotonic()
            seconds = max(0.0, min(left, gap))
            try:
                self._call(_QPOP, _I64.pack(_wire_ms(seconds)) + _INIT_FIELD, seconds, ("init/",))
                return
            except StoreTimeout:
                joined = self._call(_GET, _I64.pack(0) + _ONE_KEY + _INIT_FIELD, 0.0, ("init/",))[4:].decode()
            if seconds >= left:
                raise StoreTimeout("Timed out after %d seconds waiting for clients. %s/%d clients joined."
                                   % (math.ceil(self.timeout), joined, world_size)) from None
            log.warning("store on port %d: waiting for clients, %s/%d joined (%d s left)",
                        self.port, joined, world_size, round(deadline - time.monotonic()))
            gap = min(gap * 2, 10.0)

    @property
    def server(self):
        """The in-process StoreServer when is_master, else None."""
        return self._server

    def _where(self):
        return "%s:%s" % (self.host, self.port)

    def _connect(self, deadline):
        """Connect, retrying until `deadline` while the host name does not resolve or the server
        refuses or can't be reached (as torch does: pods and DNS records often appear after the job
        starts), and telling the log what it waits for at a human pace."""
        pace, delay, last = _Pace(), 0.01, None
        while True:
            try:
                addresses = _resolve(self.host, self.port)
            except _Unresolved as e:
                addresses, last = (), e
                delay = max(delay, 0.25)   # a lookup may ask a DNS server: never many a second
            for family, sockaddr in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.settimeout(max(0.05, min(5.0, deadline - time.monotonic())))
                    sock.connect(sockaddr)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    _keepalive(sock)
                    offer = self._handshake(sock, deadline)
                    if offer:
                        sock = self._go_local(sock, offer, deadline)
                    self._blocking(sock)
                    return sock
                except (StoreAuthError, StoreConnectionError):
                    sock.close()
                    raise
                except (OSError, EOFError) as e:
                    sock.close()
                    last = e
            left = deadline - time.monotonic()
            if left <= 0:
                # torch's DistNetworkError words first, then what stood in the way
                raise StoreConnectionError("The client socket has timed out after %s while trying to connect "
                                           "to (%s, %s): %s" % (_ms(self.timeout), self.host, self.port,
                                                                self._obstacle(last)))
            if pace.due():
                log.warning("%s (retrying, %d s left)", self._obstacle(last, narrate=True), round(left))
            time.sleep(min(left, delay * random.uniform(0.5, 1.5)))   # the last try comes at the deadline
            delay = min(delay * 2, 1.0)

    def _obstacle(self, error, narrate=False):
        """What keeps us from the store, for the log (`narrate`) or the final error."""
        if isinstance(error, _Unresolved):
            if narrate:
                return "store host %s does not resolve yet" % self.host
            return "the host name %r does not resolve (%s)" % (self.host, error)
        if narrate:
            if isinstance(error, ConnectionRefusedError):
                return "store %s refuses connections" % self._where()
            return "store %s: %s" % (self._where(), _describe(error))
        return _describe(error)

    def _handshake(self, sock, deadline):
        """Hello, and the proof when the server asks for one; returns the server's offer of its
        same-host socket (empty when it made none)."""
        sock.settimeout(max(0.05, min(_LONGEST, deadline - time.monotonic())))
        sock.sendall(_U32.pack(5) + _MAGIC + bytes([PROTOCOL_VERSION]))
        welcome = _recv_frame(sock, _HANDSHAKE_FRAME_LIMIT)
        if len(welcome) < 2:
            raise EOFError("short welcome")
        status, version = welcome[0], welcome[1]
        features, offer = welcome[2:3], welcome[3:]
        if status == _VERSION:
            raise StoreConnectionError("the store at %s speaks protocol version %d; this client speaks %d"
                                       % (self._where(), version, PROTOCOL_VERSION))
        if status == _BUSY:
            raise StoreConnectionError("the store at %s turned us away: it has reached its connection limit"
                                       % self._where())
        if status == _PROOF:
            if self._token is None:
                raise StoreAuthError("the store at %s requires a token and none was given" % self._where())
            challenge, nonce = welcome[2:], os.urandom(_CHALLENGE_SIZE)
            sock.sendall(_field(_proof(self._token, challenge) + nonce))
            verdict = _recv_frame(sock, _HANDSHAKE_FRAME_LIMIT)
            if verdict[:1] != bytes([_READY]):
                raise StoreAuthError("the store at %s refused our token (a wrong token, or a store.py too old to "
                                     "prove it knows the token)" % self._where())
            if not _same(verdict[1:1 + _CHALLENGE_SIZE], _server_proof(self._token, nonce, challenge)):
                raise StoreAuthError("the store at %s did not prove it knows the token; refusing it (is another "
                                     "program holding its port?)" % self._where())
            features, offer = verdict[1 + _CHALLENGE_SIZE:2 + _CHALLENGE_SIZE], verdict[2 + _CHALLENGE_SIZE:]
        elif status == _READY and self._token is not None:
            # a store of this token asks for it: one that lets us in without, knows nothing of it
            raise StoreAuthError("the store at %s did not ask for the token, so it cannot prove it is the "
                                 "token's store; refusing it (is another program holding its port, or does the "
                                 "store run without a token?)" % self._where())
        elif status != _READY:
            raise EOFError("unexpected welcome status %d" % status)
        self._features = features[0] if features else 0   # an older server sends none
        return offer if self._features & _F_LOCAL else b""

    def _go_local(self, sock, offer, deadline):
        """Move from TCP to the server's same-host socket with the ticket it offered; on any failure
        (another network namespace, no Unix sockets, a refusal) stay on `sock`."""
        size = offer[0]
        name, ticket = offer[1:1 + size], offer[1 + size:]
        if size == 0 or len(ticket) != _TICKET_SIZE:
            return sock
        local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            local.settimeout(max(0.05, min(5.0, deadline - time.monotonic())))
            local.connect(name)
            local.sendall(_field(_LOCAL_MAGIC + bytes([PROTOCOL_VERSION]) + ticket))
            verdict = _recv_frame(local, _HANDSHAKE_FRAME_LIMIT)
            if len(verdict) < 3 or verdict[0] != _READY:
                raise EOFError("the same-host socket refused our ticket")
        except (OSError, EOFError) as e:
            local.close()
            log.debug("store: staying on TCP to %s: %s", self._where(), _describe(e))
            return sock
        except BaseException:
            local.close()
            raise
        self._features = verdict[2]
        sock.close()
        return local

    # -- request plumbing

    def _call(self, op, body, wait=None, keys=(), empty=None):
        """Send one request and return the reply body. `wait`: seconds the server may park it.
        `empty`: the error to raise for TIMEOUT instead of StoreTimeout (a non-blocking pop's).

        Interrupted anywhere (Ctrl-C), a request leaves the client usable, or closed with a reason
        when part of a frame may have been sent or a reply lost: never holding a lock or a role
        another thread waits for.
        """
        send_lock = self._send_lock
        if send_lock._is_owned():   # only a signal handler can call in the middle of a request
            raise StoreError("a store request was made (from a signal handler?) while this thread's "
                             "previous request is unfinished; it would wait for itself")
        try:
            if not send_lock.acquire(False):
                status, result = self._shared(op, body, wait)
            elif self._waiting or self._reading or self._rbuf:   # other requests are in flight: join them
                send_lock.release()
                status, result = self._shared(op, body, wait)
            elif wait is None:
                status, result = self._exchange(op, body)   # releases the send lock
            else:
                status, result = self._alone(op, body, wait)   # releases the send lock once sent
        except BaseException:
            if send_lock._is_owned():   # interrupted before the callee's own finally could release it
                send_lock.release()
            raise
        if status == _OK:
            return result
        if status == _TIMEOUT:
            if empty is not None:
                raise empty
            # torch's C++ store names each key with its "/" prefix; scripts match those words
            raise StoreTimeout("wait timeout after %s, keys: %s (store at %s)"
                               % (_ms(wait), ", ".join("/" + k for k in keys), self._where()))
        raise StoreError(result.decode("utf-8", "replace"))

    def _exchange(self, op, body):
        """The round trip of a request the server answers at once, when no other is in flight.

        The caller holds the send lock, and we keep it until the reply is in: nobody else is
        registered or reading, and nobody can register while we hold it, so the socket is ours
        alone and the round trip needs no other lock. Threads that send meanwhile wait one round
        trip for the lock.
        """
        try:
            self._rid = rid = (self._rid + 1) & 0xFFFFFFFF
            return self._receive(self._send(op, rid, body), rid, self._armed_default)
        finally:
            self._send_lock.release()

    def _alone(self, op, body, wait):
        """The round trip of a request the server may park, when no other is in flight.

        The caller holds the send lock and nothing is registered or being read, so we become the
        reading thread without the registration the shared path needs, and let go of the send lock
        once the request is out: other threads send while the server holds ours, register as usual,
        and are handed their replies.
        """
        me, rid = _get_ident(), None
        try:
            self._reading = me
            self._rid = rid = (self._rid + 1) & 0xFFFFFFFF
            try:
                sock = self._send(op, rid, body)
            finally:
                self._send_lock.release()
            return self._receive(sock, rid, self._patience(wait))
        finally:
            self._pass_reading(rid, me)

    def _receive(self, sock, rid, seconds):
        """As the only reader: the reply to `rid`. Usually it is one whole frame in one recv, checked
        and returned right here."""
        try:
            try:
                if self._armed != seconds:   # inside: a close() from another thread may come first
                    self._arm(sock, seconds)
                chunk = sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                raise StoreTimeout("timeout after %s: no answer from the store at %s"
                                   % (_ms(seconds), self._where())) from None
            except OSError as e:
                self._broken(_describe(e))
            size = len(chunk)
            if size >= 9:
                length, status, frid = _HEAD.unpack_from(chunk)
                if frid == rid and length + 4 == size:
                    return status, chunk[9:]
            elif not size:
                self._broken("it closed the connection")
            self._rbuf += chunk
            return self._read_until(rid, time.monotonic() + seconds)
        except StoreError:
            raise
        except BaseException as e:
            self._interrupted(e, "reading replies")
            raise

    def _send(self, op, rid, body):
        """Put one request on the wire (the caller holds the send lock); returns the socket."""
        sock = self._sock
        if sock is None:
            raise StoreConnectionError(self._gone)
        frame = _HEAD.pack(_HEAD_SIZE + len(body), op, rid) + body
        try:
            sock.sendall(frame)
        except OSError as e:   # part of a frame may be on the wire: this connection is done
            self._end("lost the store at %s: %s" % (self._where(), _describe(e)))
            raise StoreConnectionError(self._gone) from e
        except BaseException as e:   # interrupted (Ctrl-C): the next frame would complete this one
            self._interrupted(e, "being sent")
            raise
        return sock

    def _patience(self, wait):
        """How long to wait for a reply. A parked request (`wait` seconds) is answered with TIMEOUT
        by the server itself; waiting longer only guards against a dead server, and lets that
        TIMEOUT, which names the keys, arrive first. At most a year: a thread's lock and the
        kernel's timeouts take no more."""
        return self._armed_default if wait is None else min(wait + max(5.0, 0.1 * wait), _LONGEST)

    def _shared(self, op, body, wait):
        """The round trip beside other threads' requests: register, send, then read or be handed the
        reply."""
        if self._sock is None:
            raise StoreConnectionError(self._gone)
        patience = self._patience(wait)
        deadline = time.monotonic() + patience
        if not self._send_lock.acquire(timeout=patience):   # held through another thread's round trip
            raise StoreTimeout("timeout after %s: the store at %s left another request unanswered"
                               % (_ms(patience), self._where()))
        me, rid = _get_ident(), None
        try:
            try:
                self._rid = rid = (self._rid + 1) & 0xFFFFFFFF
                with self._lock:   # registered before sending, so whoever reads the reply keeps it for us
                    self._waiting[rid] = None
                    reader = not self._reading   # nobody reading: we will, without a second lock trip
                    if reader:
                        self._reading = me
                self._send(op, rid, body)
            finally:
                self._send_lock.release()
            if reader:
                return self._read_own(rid, deadline, me)
            return self._await(rid, deadline, me)
        except BaseException:   # a failed send, a timeout, or an interruption at any point
            self._pass_reading(rid, me)
            raise

    def _await(self, rid, deadline, me):
        """Wait for the reply to `rid`: read the socket ourselves, or sleep while another thread does.

        Whichever thread reads hands every other thread its reply and, when it has its own, passes
        the reading on to one thread still waiting. Uncontended, this is two lock round trips.
        """
        lock, waiting, replies = self._lock, self._waiting, self._replies
        while True:
            with lock:
                reply = replies.pop(rid, None)
                if reply is not None:
                    waiting.pop(rid, None)
                    return reply
                if self._sock is None:
                    waiting.pop(rid, None)
                    raise StoreConnectionError(self._gone)
                if not self._reading:
                    self._reading = me
                    break
                sleeper = waiting.get(rid)
                if sleeper is None:
                    sleeper = waiting[rid] = threading.Lock()
                    sleeper.acquire()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sleeper.acquire(timeout=remaining):
                with lock:
                    waiting.pop(rid, None)
                    reply = replies.pop(rid, None)
                if reply is not None:
                    return reply
                raise StoreTimeout("timeout: no answer from the store at %s" % self._where())
        return self._read_own(rid, deadline, me)

    def _read_own(self, rid, deadline, me):
        """As the reading thread: read until our reply comes, then pass the reading on."""
        try:
            return self._read_until(rid, deadline)
        finally:
            self._pass_reading(rid, me)

    def _read_until(self, rid, deadline):
        """Read replies, handing out other threads', until the one to `rid` arrives."""
        try:
            while True:
                frid, status, body = self._read_reply(deadline)
                if frid == rid:
                    return status, body
                with self._lock:
                    if frid in self._waiting:   # a reply nobody waits for any more (timed out) is dropped
                        self._replies[frid] = (status, body)
                        _wake(self._waiting[frid])
        except StoreError:
            raise
        except BaseException as e:
            self._interrupted(e, "reading replies")
            raise

    def _interrupted(self, error, doing):
        """A request was interrupted (Ctrl-C) while `doing` ("being sent": part of a frame may be on
        the wire; "reading replies": bytes may have left the socket before they were kept). Either
        way the next frame's start is lost, so the connection ends."""
        self._end("this client of the store at %s was closed because a request was interrupted (%s) "
                  "while %s" % (self._where(), type(error).__name__, doing))

    def _pass_reading(self, rid, me):
        """Withdraw the request `rid` and give up the reading if thread `me` has it, waking one thread
        that still waits for its reply to take it over. Also after an interruption: then `rid` may
        be None (nothing sent), and the reading may be another thread's, or ours by a hand-over we
        never saw."""
        with self._lock:
            if self._reading == me:
                self._reading = 0
            waiting = self._waiting
            if waiting:   # empty when we were alone
                replies = self._replies
                waiting.pop(rid, None)
                replies.pop(rid, None)
                if not self._reading:
                    for other, sleeper in waiting.items():
                        if other not in replies and sleeper is not None and sleeper.locked():
                            sleeper.release()
                            break

    def _read_reply(self, deadline):
        buf, sock = self._rbuf, self._sock
        while True:
            if len(buf) >= _HEAD.size:
                length, status, frid = _HEAD.unpack_from(buf, 0)
                if length < _HEAD_SIZE or length > MAX_FRAME_SIZE:
                    self._broken("a malformed reply")
                end = 4 + length
                if len(buf) >= end:
                    body = bytes(buf[_HEAD.size:end])
                    del buf[:end]
                    return frid, status, body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreTimeout("timeout: no answer from the store at %s" % self._where())
            if sock is None:
                raise StoreConnectionError(self._gone)
            try:
                self._arm(sock, remaining)
                chunk = sock.recv(max(65536, end - len(buf)) if len(buf) >= _HEAD.size else 65536)
            except (socket.timeout, BlockingIOError):   # BlockingIOError: SO_RCVTIMEO ran out
                raise StoreTimeout("timeout: no answer from the store at %s" % self._where()) from None
            except OSError as e:
                self._broken(_describe(e))
            if not chunk:
                self._broken("it closed the connection")
            if not buf and len(chunk) >= _HEAD.size:  # the common case: exactly one whole reply
                length, status, frid = _HEAD.unpack_from(chunk)
                if length + 4 == len(chunk) and length >= _HEAD_SIZE:
                    return frid, status, chunk[_HEAD.size:]
            buf += chunk

    def _blocking(self, sock):
        """Put the socket in blocking mode with kernel send/receive timeouts.

        A Python socket with a timeout polls before every send and receive, and setting the timeout
        is an ioctl: three system calls a request on top of the two it needs. With SO_RCVTIMEO and
        SO_SNDTIMEO the kernel keeps the deadline instead; where they can't be set, we keep
        Python's timeouts.
        """
        self._armed = None
        try:
            sock.settimeout(None)
            self._arm(sock, self._armed_default)
        except OSError:
            sock.settimeout(self._armed_default)
            self._armed = False

    def _arm(self, sock, seconds):
        """Make the next blocking receive give up after `seconds`, or at most 10% later.

        Never sooner: a parked get's receive must outlast the server's own TIMEOUT reply. Within
        that slack the kernel's setting stays, so alternating gets and adds make no system call.
        """
        armed = self._armed
        if armed is False:
            sock.settimeout(seconds)
        elif armed is None or not seconds <= armed <= seconds * 1.1:
            whole = int(seconds)
            micros = int((seconds - whole) * 1e6)
            if not whole and micros < 1000:   # an all-zero timeval would mean "wait forever"
                micros = 1000
            timeval = _TIMEVAL.pack(whole, micros)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self._armed = seconds

    def _broken(self, why):
        self._end("lost the store at %s: %s" % (self._where(), why))
        raise StoreConnectionError(self._gone)

    def _end(self, why):
        """Close the connection for good. The first reason given is the one every later call reports:
        a read that fails because close() shut the socket says the client was closed, and a call
        after the server went away says so rather than blaming a close() nobody made."""
        with self._lock:
            if self._gone is None:
                self._gone = why
            sock, self._sock = self._sock, None
            for sleeper in self._waiting.values():   # threads waiting for replies learn it at once
                _wake(sleeper)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _wait_ms(self, timeout):
        seconds = self.timeout if timeout is None else _seconds(timeout)
        return seconds, _wire_ms(seconds)

    # -- the API

    def set(self, key, value):
        self._call(_SET, _key_field(key) + _field(_value_bytes(value)))

    def get(self, key):
        """The value of `key`, waiting up to the store timeout for it to exist."""
        seconds, ms = self._wait_ms(None)
        body = self._call(_GET, _I64.pack(ms) + _ONE_KEY + _key_field(key), seconds, (key,))
        return body[4:]

    def add(self, key, amount):
        """Add `amount` to the integer at `key` (missing counts as 0); returns the new value."""
        if amount.__class__ is not int and not isinstance(amount, int):
            raise TypeError("add takes an int, got %s" % type(amount).__name__)
        if not -0x8000000000000000 <= amount <= 0x7FFFFFFFFFFFFFFF:
            raise ValueError("add: %d is outside the signed 64-bit range the store counts in" % amount)
        return _I64.unpack(self._call(_ADD, _key_field(key) + _I64.pack(amount)))[0]

    def compare_set(self, key, expected, desired):
        fields = (_key_field(key), _field(_value_bytes(expected)), _field(_value_bytes(desired)))
        _check_request(sum(map(len, fields)), "an expected and a desired value")
        return self._call(_CAS, b"".join(fields))[4:]

    def wait(self, keys, timeout=None):
        """Wait until every key exists; StoreTimeout names them if `timeout` passes first."""
        keys = _as_keys(keys)
        seconds, ms = self._wait_ms(timeout)
        self._call(_WAIT, _I64.pack(ms) + _keys_field(keys), seconds, keys)

    def check(self, keys):
        keys = _as_keys(keys)
        return self._call(_CHECK, _keys_field(keys)) == b"\x01"

    def delete_key(self, key):
        return self._call(_DELETE, _key_field(key)) == b"\x01"

    def num_keys(self):
        return _I64.unpack(self._call(_COUNT, b""))[0]

    def multi_get(self, keys):
        """The values of all `keys`, waiting up to the store timeout for every one to exist."""
        keys = _as_keys(keys)
        seconds, ms = self._wait_ms(None)
        body = self._call(_GET, _I64.pack(ms) + _keys_field(keys), seconds, keys)
        values, pos = [], 0
        for _ in keys:
            (size,) = _U32.unpack_from(body, pos)
            values.append(body[pos + 4:pos + 4 + size])
            pos += 4 + size
        return values

    def multi_set(self, keys, values):
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError("multi_set got %d keys and %d values" % (len(keys), len(values)))
        fields = [_key_field(k) + _field(_value_bytes(v)) for k, v in zip(keys, values)]
        _check_request(4 + sum(map(len, fields)), "%d keys and values" % len(keys))
        self._call(_MSET, _U32.pack(len(keys)) + b"".join(fields))

    def append(self, key, value):
        self._call(_APPEND, _key_field(key) + _field(_value_bytes(value)))

    def set_ephemeral(self, key, value):
        """Set `key` for as long as this client is connected: the server deletes it when this
        connection closes (``close()``, or this process dies), unless an ordinary write replaced it."""
        if not self.supports_ephemeral:
            raise StoreError("the store at %s does not know set_ephemeral: it runs an older store.py"
                             % self._where())
        self._call(_EPHEMERAL, _key_field(key) + _field(_value_bytes(value)))

    @property
    def supports_ephemeral(self):
        """Whether the server knows ``set_ephemeral`` (an older one does not)."""
        return bool(self._features & _F_EPHEMERAL)

    def wait_gone(self, keys, timeout=None):
        """Wait until at least one of `keys` does not exist (deleted, or gone with the connection
        that set it ephemeral); StoreTimeout names them if `timeout` passes first."""
        keys = _as_keys(keys)
        if not self.supports_gone:
            raise StoreError("the store at %s does not know wait_gone: it runs an older store.py"
                             % self._where())
        seconds, ms = self._wait_ms(timeout)
        self._call(_GONE, _I64.pack(ms) + _keys_field(keys), seconds, keys)

    @property
    def supports_gone(self):
        """Whether the server knows ``wait_gone`` (an older one does not)."""
        return bool(self._features & _F_GONE)

    def beat(self, key, value, watch, timeout):
        """A heartbeat in one request: ``set_ephemeral(key, value)``, then wait until one of the keys
        in `watch` does not exist. Returns None then; when `timeout` passes first, their values."""
        keys = _as_keys(watch)
        if not self.supports_beat:
            raise StoreError("the store at %s does not know beat: it runs an older store.py" % self._where())
        seconds, ms = self._wait_ms(timeout)
        fields = (_key_field(key), _field(_value_bytes(value)), _I64.pack(ms), _keys_field(keys))
        _check_request(sum(map(len, fields)), "a heartbeat")
        body = self._call(_BEAT, b"".join(fields), seconds, keys)
        if body[:1] != b"\x00":
            return None
        values, pos = [], 1
        for _ in keys:
            (size,) = _U32.unpack_from(body, pos)
            values.append(body[pos + 4:pos + 4 + size])
            pos += 4 + size
        return values

    @property
    def supports_beat(self):
        """Whether the server knows ``beat`` (an older one does not)."""
        return bool(self._features & _F_BEAT)

    def queue_push(self, key, value):
        """Append `value` to the queue named `key`. Queues live beside keys: see "Queues" above."""
        self._need_queues()
        self._call(_QPUSH, _key_field(key) + _field(_value_bytes(value)))

    def queue_pop(self, key, block=True, timeout=None):
        """The oldest value of the queue `key`, removed from it. With `block`, wait up to `timeout`
        (default: the store timeout) for one to be pushed, then raise StoreTimeout; without,
        raise QueueEmptyError at once when the queue is empty. Each value goes to one pop only."""
        self._need_queues()
        seconds, ms = self._wait_ms(timeout) if block else (0.0, 0)
        empty = None if block else QueueEmptyError("queue is empty: %s (store at %s)" % (key, self._where()))
        return self._call(_QPOP, _I64.pack(ms) + _key_field(key), seconds, (key,), empty)[4:]

    def queue_len(self, key):
        """How many values wait in the queue `key` (0 for a queue never pushed to)."""
        self._need_queues()
        return _I64.unpack(self._call(_QLEN, _key_field(key)))[0]

    def _need_queues(self):
        if not self._features & _F_QUEUE:
            raise StoreError("the store at %s does not know queues: it runs an older store.py"
                             % self._where())

    def has_extended_api(self):
        """True, as torch's TCPStore: ``append``, ``multi_get`` and ``multi_set`` are served."""
        return True

    def list_keys(self):
        """The names of every key in the store (not the queues), in no particular order."""
        if not self._features & _F_LIST:
            raise StoreError("the store at %s does not know list_keys: it runs an older store.py"
                             % self._where())
        body = self._call(_LIST, b"")
        (count,) = _U32.unpack_from(body)
        keys, pos = [], 4
        for _ in range(count):
            (size,) = _U32.unpack_from(body, pos)
            key = body[pos + 4:pos + 4 + size]
            if key != _INIT_KEY:   # counted by num_keys, as torch's; named by nobody
                keys.append(key.decode("utf-8", "replace"))
            pos += 4 + size
        return keys

    def barrier(self, key, world_size, timeout=None):
        """Return once `world_size` callers have called ``barrier(key, world_size)``; StoreTimeout
        after `timeout` (default: the store timeout). A key serves one barrier: it counts in the keys
        ``key/num_members`` and ``key/last_member``, as torch's PrefixStore does (torch's TCPStore
        counts in `key` itself)."""
        _check_world_size(world_size)
        seconds = self.timeout if timeout is None else _seconds(timeout)
        if self.add(key + "/num_members", 1) == world_size:
            self.set(key + "/last_member", "1")
        try:
            self.wait([key + "/last_member"], seconds)
        except StoreTimeout:
            raise StoreTimeout("barrier timeout after %s, key: %s (store at %s)"
                               % (_ms(seconds), key, self._where())) from None

    def clone(self):
        """A new client of the same store on a connection of its own, with this one's timeout and
        token; it never hosts the server. (torch clones a store per thread; ours may also be shared.)"""
        return TCPStore(self.host, self.port, timeout=self.timeout, token=self._token)

    @property
    def timeout(self):
        """Seconds a request waits for its answer (and `get`/`wait` for their keys) by default."""
        return self._timeout

    @timeout.setter
    def timeout(self, timeout):
        self._timeout = _seconds(timeout)
        self._armed_default = min(max(self._timeout, 1.0), _LONGEST)   # the socket's usual receive timeout

    def set_timeout(self, timeout):
        self.timeout = timeout

    def close(self):
        """Close the connection (and stop the in-process server when this client hosts it; a
        ``multi_tenant`` server once the last master sharing it is closed)."""
        self._end("this client of the store at %s was closed" % self._where())
        if self._server is not None:
            self._stop_server()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "TCPStore(%r, %r%s)" % (self.host, self.port, ", is_master=True" if self._server else "")


_get_ident = threading.get_ident
_INIT_KEY = b"\xffinit/"   # torch's world-size key: 0xff is in no UTF-8 text, so no str key is this one
_INIT_FIELD = _U32.pack(len(_INIT_KEY)) + _INIT_KEY
_TENANTS = {}              # port -> [server, masters using it]: torch's multi_tenant registry
_TENANTS_LOCK = threading.Lock()


def _agent_store_at(port):
    """torch's rule: a worker whose agent serves the store (TORCHELASTIC_USE_AGENT_STORE true and
    MASTER_PORT this port) connects to it instead of serving."""
    use = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower()
    return use in ("1", "true", "yes", "on") and os.environ.get("MASTER_PORT", "").strip() == str(port)


def _host_server(bind, port, token, multi_tenant, listen_fd):
    """A started server for a master, and whether it is a shared multi_tenant one."""
    if not multi_tenant:
        return StoreServer(bind, port, token=token, listen_fd=listen_fd).start(), False
    with _TENANTS_LOCK:
        entry = _TENANTS.get(port) if port else None   # port 0: a new server, which later tenants may share
        if entry is None or entry[0]._stopping:
            server = StoreServer(bind, port, token=token, listen_fd=listen_fd).start()
            entry = _TENANTS[server.port] = [server, 0]
        entry[1] += 1
        return entry[0], True


def _release_server(server, shared):
    """A master lets go of its server: stop it, unless other multi_tenant masters still use it."""
    if shared:
        with _TENANTS_LOCK:
            entry = _TENANTS.get(server.port)
            if entry is not None and entry[0] is server:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _TENANTS[server.port]
    server.stop()


def _wake(sleeper):
    """Release a waiting thread's lock (all releases happen under the client's lock, so no race)."""
    if sleeper is not None and sleeper.locked():
        sleeper.release()


def _check_world_size(world_size):
    if world_size.__class__ is not int and not isinstance(world_size, int) or world_size < 1:
        raise ValueError("barrier: world_size must be an int of at least 1, got %r" % (world_size,))


def _as_keys(keys):
    if isinstance(keys, str):
        raise TypeError("pass a list of keys, not a single str")
    return list(keys)


def _ms(seconds):
    """A duration as torch's store messages give it ("wait timeout after 100ms")."""
    return "%dms" % round(seconds * 1000)


def _describe(error):
    if isinstance(error, BrokenPipeError):   # a send after the server closed (at once on a Unix socket)
        return "it closed the connection"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _recv_frame(sock, limit):
    header = _recv_exactly(sock, 4)
    (length,) = _U32.unpack(header)
    if length > limit:
        raise EOFError("frame of %d bytes from the server exceeds %d" % (length, limit))
    return _recv_exactly(sock, length)


def _recv_exactly(sock, size):
    """Exactly `size` bytes from a blocking socket; EOFError when the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the peer closed the connection after %d of %d bytes" % (len(data), size))
        data += chunk
    return data


class PrefixStore:
    """A view of `store` whose keys all live under ``prefix/``."""

    _owns = False   # True for a clone(): closing it closes the store it cloned

    def __init__(self, prefix, store):
        if store is None:
            raise ValueError("PrefixStore: store argument cannot be None")
        if not isinstance(prefix, str):
            raise TypeError("PrefixStore: prefix must be a str, got %s" % type(prefix).__name__)
        self.prefix = prefix
        self.underlying_store = store

    def _k(self, key):
        return self.prefix + "/" + key

    @property
    def _underlying_non_prefix_store(self):
        """The store under every PrefixStore layer (torch's name for it)."""
        store = self.underlying_store
        while isinstance(store, PrefixStore):
            store = store.underlying_store
        return store

    def set(self, key, value):
        self.underlying_store.set(self._k(key), _value_bytes(value))

    def get(self, key):
        return self.underlying_store.get(self._k(key))

    def add(self, key, amount):
        return self.underlying_store.add(self._k(key), amount)

    def compare_set(self, key, expected, desired):
        return self.underlying_store.compare_set(self._k(key), _value_bytes(expected), _value_bytes(desired))

    def wait(self, keys, timeout=None):
        self.underlying_store.wait([self._k(k) for k in _as_keys(keys)], timeout)

    def check(self, keys):
        return self.underlying_store.check([self._k(k) for k in _as_keys(keys)])

    def delete_key(self, key):
        return self.underlying_store.delete_key(self._k(key))

    def num_keys(self):
        return self.underlying_store.num_keys()

    # values reach the underlying store as bytes, as torch's PrefixStore hands them on; over a store
    # without append/multi_get/multi_set (a user's own), these fall back to its basic methods as
    # torch's Store base class does

    def multi_get(self, keys):
        keys = [self._k(k) for k in _as_keys(keys)]
        multi_get = getattr(self.underlying_store, "multi_get", None)
        if multi_get is None:
            return [self.underlying_store.get(k) for k in keys]
        return multi_get(keys)

    def multi_set(self, keys, values):
        keys, values = [self._k(k) for k in keys], [_value_bytes(v) for v in values]
        if len(keys) != len(values):
            raise ValueError("multi_set got %d keys and %d values" % (len(keys), len(values)))
        multi_set = getattr(self.underlying_store, "multi_set", None)
        if multi_set is None:
            for k, v in zip(keys, values):
                self.underlying_store.set(k, v)
        else:
            multi_set(keys, values)

    def append(self, key, value):
        key, value = self._k(key), _value_bytes(value)
        append = getattr(self.underlying_store, "append", None)
        if append is not None:
            return append(key, value)
        # compare_set until no other writer came between; never a get of a missing key (it waits)
        store, check = self.underlying_store, getattr(self.underlying_store, "check", None)
        if check is not None and check([key]):
            current = store.get(key)
        else:
            current = store.compare_set(key, b"", value)   # creates it when missing
            if current == value:
                return
        while True:
            now = store.compare_set(key, current, current + value)
            if now == current + value:
                return
            current = now

    def queue_push(self, key, value):
        self.underlying_store.queue_push(self._k(key), _value_bytes(value))

    def queue_pop(self, key, block=True, timeout=None):
        return self.underlying_store.queue_pop(self._k(key), block, timeout)

    def queue_len(self, key):
        return self.underlying_store.queue_len(self._k(key))

    def has_extended_api(self):
        has = getattr(self.underlying_store, "has_extended_api", None)
        return bool(has and has())

    def list_keys(self):
        """The keys under this prefix, without it."""
        start = self.prefix + "/"
        return [key[len(start):] for key in self.underlying_store.list_keys() if key.startswith(start)]

    def barrier(self, key, world_size, timeout=None):
        self.underlying_store.barrier(self._k(key), world_size, timeout)

    def clone(self):
        """The same view over a clone of the underlying store (a connection of its own, which
        closing this clone closes)."""
        clone = PrefixStore(self.prefix, self.underlying_store.clone())
        clone._owns = True
        return clone

    def set_timeout(self, timeout):
        self.underlying_store.set_timeout(timeout)

    @property
    def timeout(self):
        return self.underlying_store.timeout

    def close(self):
        """A prefix view owns nothing, and closing it leaves the underlying store open; except a
        clone(), which closes the connection it was given."""
        if self._owns:
            self.underlying_store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------- Command line

def _main(argv=None):
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="store.py", description="Serve a key-value store in the foreground.")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=29400, help="port to listen on, 0 for any (default 29400)")
    parser.add_argument("--token-file", help="require clients to prove they know this file's secret")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING").upper(),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not 0 <= args.port <= 65535:
        parser.exit(2, "store.py: error: --port must be from 0 to 65535, got %d\n" % args.port)
    try:
        token = _read_token_file(args.token_file) if args.token_file else None
        server = StoreServer(args.host, args.port, token=token, max_connections=args.max_connections)
    except (OSError, ValueError, StoreError) as e:
        parser.exit(2, "store.py: error: %s\n" % e)

    def stop(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("listening on %s:%d" % (args.host, server.port), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
