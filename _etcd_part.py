# SPDX-License-Identifier: BSD-3-Clause
# ----------------------------------------------------------------------------------- etcd backend
#
# This section is written to be merged into rendezvous.py (everything private starts with ``_etcd``
# so it cannot collide with the rest of that module). Until then it works as a module of its own.
"""EtcdStore: the store API over etcd's v3 HTTP/JSON gateway, standard library only.

The rendezvous algorithm only needs an object with the store's methods; ``EtcdStore`` is that object
for ``--rdzv-backend etcd``, so the rendezvous state lives in an existing, replicated etcd cluster
instead of one node's TCPStore::

    s = EtcdStore("http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379", prefix="job42")
    s.add("joined", 1)                  # a transaction on the key's mod revision, retried on conflict
    s.get("ready")                      # waits on a watch stream, never polls
    s.set_ephemeral("alive/node3", "1") # bound to this client's lease: gone soon after we die

How each operation maps onto etcd (keys and values travel base64 in JSON; int64s are strings)::

    set, multi_set        POST /v3/kv/put, /v3/kv/txn (puts)
    get, multi_get, wait  POST /v3/kv/txn (ranges) -> revision R; keys missing at R are watched with
                          POST /v3/watch {create_request: key, start_revision: R+1} until they appear
    add, append,          range -> compute -> POST /v3/kv/txn compare mod_revision == seen;
    compare_set           a failed compare returns the fresh value and we go again
    check, num_keys       POST /v3/kv/txn (count-only ranges)
    delete_key            POST /v3/kv/deleterange
    set_ephemeral         POST /v3/lease/grant once (ttl), then put with that lease; a daemon thread
                          renews it every ttl/3 (POST /v3/lease/keepalive); close() revokes it

Semantics are the store's (and torch's): keys ``str``, values ``str``/``bytes`` in, ``bytes`` out; a
timeout raises ``StoreTimeout`` naming the keys and leaves the client usable; ``compare_set`` on a
missing key with a non-empty ``expected`` returns ``expected`` and stores nothing. Every key lives
under ``prefix/`` in etcd, so several jobs can share one cluster.

Failover: the endpoints are members of one cluster. A request that cannot reach a member (refused,
reset, no answer, "no leader") moves on to the next member, round robin; ``StoreConnectionError`` is
raised only when every member kept failing until the timeout. Watches ask the member to drop them when
it loses its leader, and resume elsewhere from the last revision seen, so no event is lost.
A mutation whose answer was lost with its connection may or may not have been applied: ``add`` and
``append`` write, in the same transaction, a per-thread marker key outside the user's keys, and read
it back to find out instead of guessing (a lost answer never double-counts).

The gateway's path prefix is probed once: ``/v3`` (etcd 3.4+), else ``/v3beta`` (3.3), else
``/v3alpha`` (3.2). Host names are resolved once, when the store is created.
"""

import base64
import http.client
import json
import logging
import random
import socket
import threading
import time
import uuid

try:
    from . import store as _store
except ImportError:
    import store as _store

log = logging.getLogger(__name__)

ETCD_DEFAULT_PORT = 2379
ETCD_DEFAULT_LEASE_TTL = 10.0
_ETCD_API_PATHS = ("/v3", "/v3beta", "/v3alpha")
_ETCD_CONNECT_TIMEOUT = 3.0     # a member that does not accept within this is skipped for now
_ETCD_REQUEST_TIMEOUT = 5.0     # no answer by then: the member is cut off or stuck; ask another one
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


def _etcd_seconds(timeout):
    seconds = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout)
    if seconds < 0:
        raise ValueError("timeout must be >= 0 seconds, got %r" % (timeout,))
    return seconds


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


def _etcd_keepalive(sock, idle=5, interval=2, count=5):
    """Notice a member that vanished without closing (cut link, power loss): after about
    idle + interval * count seconds of silence the kernel fails our reads."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _etcd_parse_endpoints(endpoints):
    """[(url, address, port)] from URLs or a comma-separated string; each name resolved once, here."""
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    members = []
    for raw in endpoints:
        text = raw.strip()
        if not text:
            continue
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "http", text
        if scheme != "http":
            raise ValueError("etcd endpoint %r: only http:// endpoints are supported" % raw)
        hostport = rest.split("/", 1)[0]
        if hostport.startswith("["):
            host, _, tail = hostport[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else ""
        elif hostport.count(":") == 1:
            host, port = hostport.split(":")
        else:
            host, port = hostport, ""
        try:
            port = int(port) if port else ETCD_DEFAULT_PORT
        except ValueError:
            raise ValueError("etcd endpoint %r: bad port %r" % (raw, port)) from None
        if not host or not 0 < port < 65536:
            raise ValueError("etcd endpoint %r: expected http://host:port" % raw)
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
        conn = http.client.HTTPConnection(member[1], member[2], timeout=min(remaining, _ETCD_CONNECT_TIMEOUT))
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _etcd_keepalive(conn.sock)
        except OSError as e:
            conn.close()
            raise _EtcdUnreachable("cannot connect: %s" % _etcd_describe(e)) from None
        self.conn, self.conn_index = conn, index
        return conn

    def _post(self, index, member, path, body, remaining, idempotent):
        """One attempt on one member: the decoded JSON answer, or _EtcdUnreachable/_EtcdAmbiguous."""
        conn = self._connect(index, member, remaining)
        try:
            conn.sock.settimeout(max(0.05, min(remaining, _ETCD_REQUEST_TIMEOUT)))
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
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
        failures, delay, attempts = {}, 0.05, 0
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
                answer = self._post(index, member, members.api + path, body, max(remaining, 0.05), idempotent)
                if answer is None:
                    raise _store.StoreError("etcd at %s has no JSON gateway path %s%s"
                                            % (member[0], members.api, path))
                return answer
            except _EtcdUnreachable as e:
                failures[member[0]] = str(e)
                members.skip(index)
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
        self.timeout = _etcd_seconds(timeout)
        self.lease_ttl = ETCD_DEFAULT_LEASE_TTL if lease_ttl is None else _etcd_seconds(lease_ttl)
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

    def _watch(self, states, start_revision, deadline, keys):
        """Follow the keys in `states` from `start_revision` until each holds a value."""
        members = self._members
        index, member = members.pick()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._timed_out(keys)
        conn = http.client.HTTPConnection(member[1], member[2], timeout=min(remaining, _ETCD_CONNECT_TIMEOUT))
        try:
            try:
                conn.connect()
                # a watch is silent until its event comes: let the kernel probe the member meanwhile,
                # so a cut link ends the stream in ~5 s and we resume on another member (no polling)
                _etcd_keepalive(conn.sock, idle=2, interval=1, count=3)
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
                            states[key] = None if event.get("type") == "DELETE" else _etcd_unb64(kv.get("value"))
                    if all(value is not None for value in states.values()):
                        return
            except _store.StoreTimeout:
                raise
            except socket.timeout:
                if deadline - time.monotonic() <= 0.01:
                    raise _store.StoreTimeout(self._timeout_text(keys)) from None
                members.skip(index)
                raise _EtcdStreamBroken("%s did not answer the watch" % member[0]) from None
            except (OSError, http.client.HTTPException, ValueError) as e:
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
        self._wait_for(keys, self.timeout if timeout is None else _etcd_seconds(timeout))

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
        self.timeout = _etcd_seconds(timeout)

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
