# SPDX-License-Identifier: BSD-3-Clause
"""Operational pieces of elastic.py: hang watchdog (file timer), health check, Slurm, to be merged.

This file is written as a section of ``elastic.py`` reads: standard library only, module-level
names, nothing happens at import time. After the merge its names live in ``elastic``.

File timer (hang watchdog)
--------------------------
torchelastic's transport and wire format, so torch's own ``FileTimerClient`` works against our
server. The agent owns a named pipe (FIFO); every worker-side request is one JSON line written in
one ``write`` of at most ``PIPE_BUF`` bytes, so concurrent writers never interleave::

    worker (FileTimerClient)                      agent (FileTimerServer, one thread)
      with expires(after=5):                        poll([fifo, stop pipe, pidfds], timeout =
        -- {"version": 1, "pid": P,      -->  FIFO      time to the nearest expiry)
            "scope_id": S,                          timers[(P, S)] = (expiration_time, signal)
            "expiration_time": T, "signal": 9}      now >= T: kill(P, 9), record (P, S, T)
        ...                                         P exits: its timers are dropped
      -- {..., "expiration_time": -1, "signal": 0}  release: timers.pop((P, S))

``expiration_time`` is wall-clock epoch seconds (the wire format's choice), so it is the one place
that uses ``time.time()``. Every (pid, scope) pair keeps its own timer: nested scopes never replace
each other (our default scope is unique per ``expires`` call). The server never signals itself,
pid 0 or 1, or (after ``set_worker_pids``) anything outside the workers' sessions. A malformed line
is logged on one line and skipped.

Health check
------------
``_HealthServer(port, status_fn)`` answers ``GET /healthz`` from a daemon thread with 200 or 503
and a JSON body from ``status_fn() -> (healthy, dict)``; it never resolves names.

Slurm
-----
``_parse_hostlist("gpu[001-004,010],cpu7")`` expands Slurm's compressed host lists;
``_slurm_options(os.environ)`` turns srun's environment into launcher options.
"""

import http.server
import json
import logging
import os
import re
import select
import selectors
import signal
import socket
import socketserver
import stat
import sys
import threading
import time

log = logging.getLogger("elastic")

_PIPE_BUF = getattr(select, "PIPE_BUF", 512)
_MAX_PENDING = 1 << 16  # bytes of a line without newline kept before it is dropped as garbage


# ----------------------------------------------------------------------------- file timer: client

class FileTimerClient:
    """Sends timer requests to a ``FileTimerServer`` through its named pipe (torch's format).

    ``signal`` is what the server sends this process when a scope expires (SIGKILL by default; zero
    or negative means "tell the agent, don't kill"). Each request opens the pipe without blocking,
    so a missing server raises ``BrokenPipeError`` at once instead of hanging the worker.
    """

    def __init__(self, file_path, signal=signal.SIGKILL):
        self.file_path = file_path
        self.signal = int(signal)

    def acquire(self, scope_id, expiration_time):
        self._send(scope_id, float(expiration_time), self.signal)

    def release(self, scope_id):
        self._send(scope_id, -1, 0)

    def _send(self, scope_id, expiration_time, sig):
        line = json.dumps({"version": 1, "pid": os.getpid(), "scope_id": scope_id,
                           "expiration_time": expiration_time, "signal": sig}) + "\n"
        data = line.encode("utf-8")
        if len(data) > _PIPE_BUF:
            raise ValueError("timer request of %d bytes exceeds PIPE_BUF (%d): use a shorter scope id"
                             % (len(data), _PIPE_BUF))
        try:
            fd = os.open(self.file_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:  # ENXIO: nobody reads the pipe; ENOENT: no pipe at all
            raise BrokenPipeError("no FileTimerServer is serving %s (%s)" % (self.file_path, e.strerror)) from e
        try:
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    os.write(fd, data)  # one write <= PIPE_BUF: atomic, never interleaved
                    return
                except BlockingIOError:  # pipe full: the server is behind, give it a moment
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokenPipeError("FileTimerServer at %s is not reading its pipe" % self.file_path)
                    select.select([], [fd], [], left)
        finally:
            os.close(fd)


_timer_client_configured = None
_scope_counter = [0]
_scope_lock = threading.Lock()


def configure(client):
    """Set the timer client that ``expires`` uses when it is given none."""
    global _timer_client_configured
    _timer_client_configured = client


class expires:
    """``with expires(after=5): step()``: the agent kills this process if the block overruns.

    ``scope`` names the timer in the agent's report; by default it is the caller's ``file:line``
    plus a unique number, so nested and recursive blocks keep separate timers. Without ``client``
    and without ``configure()``, a worker started with ``TORCHELASTIC_TIMER_FILE`` configures itself.
    """

    def __init__(self, after, scope=None, client=None):
        if after < 0:
            raise ValueError("expires(after=%r): the time limit must not be negative" % (after,))
        self.after = after
        self.client = client
        if scope is None:
            caller = sys._getframe(1)
            with _scope_lock:
                _scope_counter[0] += 1
                n = _scope_counter[0]
            scope = "%s:%d#%d" % (caller.f_code.co_filename, caller.f_lineno, n)
        self.scope = scope

    def __enter__(self):
        if self.client is None:
            self.client = _default_timer_client()
        self.client.acquire(self.scope, time.time() + self.after)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.client.release(self.scope)
        except BrokenPipeError:
            if exc_type is None:
                raise
            # the agent is already gone: let the block's own exception through, not ours
        return False


def _default_timer_client():
    global _timer_client_configured
    if _timer_client_configured is None:
        path = os.environ.get("TORCHELASTIC_TIMER_FILE")
        if not path:
            raise RuntimeError("expires() needs a timer client: call configure(FileTimerClient(path)) "
                               "or run under the launcher with the file timer on")
        _timer_client_configured = FileTimerClient(path)
    return _timer_client_configured


# ----------------------------------------------------------------------------- file timer: server

class FileTimerServer:
    """The agent's hang watchdog: reads timer requests from a FIFO and signals overrunning workers.

    ``start()`` creates the FIFO at ``file_path`` (mode 0600) and a reader thread; ``stop()`` ends
    the thread and removes the FIFO. The thread sleeps in ``poll`` until a request arrives, the
    nearest timer expires, or a process holding timers exits (a pidfd on Linux >= 5.3 with
    Python >= 3.9; otherwise it checks liveness every ``max_interval`` seconds while timers exist).
    ``pop_expired()`` hands the agent the (pid, scope_id, expiration_time) of every timer that
    made it send a signal, for the failure report.
    """

    def __init__(self, file_path, run_id="", max_interval=0.1, daemon=True):
        if max_interval <= 0:
            raise ValueError("max_interval must be positive, got %r" % (max_interval,))
        self.file_path = file_path
        self.run_id = run_id
        self.max_interval = max_interval
        self.daemon = daemon
        self._cond = threading.Condition(threading.RLock())  # guards the fields below
        self._timers = {}        # (pid, scope_id) -> (expiration_time, signal)
        self._expired = []       # (pid, scope_id, expiration_time) signalled, not yet popped
        self._allowed = None     # worker pids (session leaders) we may signal; None = any
        self._thread = None
        self._stopping = False
        self._fifo = self._wake_r = self._wake_w = None
        self._pidfds = {}        # pid -> pidfd (watched for the process's exit)
        self._use_pidfd = hasattr(os, "pidfd_open")
        self._bad_lines = 0
        self._request_count = 0  # well-formed requests read (acquire and release)
        self._last_progress_time = time.time()

    # -- agent-facing API
    def start(self):
        if self._thread is not None:
            raise RuntimeError("FileTimerServer already started")
        self._make_fifo()
        # O_RDWR: we are a writer too, so open never blocks for a writer and reads never see EOF
        # when the last worker closes its end.
        self._fifo = os.open(self.file_path, os.O_RDWR | os.O_NONBLOCK)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="elastic-file-timer", daemon=self.daemon)
        self._thread.start()
        log.debug("file timer serving %s (run %s)", self.file_path, self.run_id or "-")

    def stop(self):
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        thread.join()
        for fd in [self._fifo, self._wake_r, self._wake_w] + list(self._pidfds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._pidfds.clear()
        with self._cond:
            self._timers.clear()
        self._fifo = self._wake_r = self._wake_w = None
        try:
            if stat.S_ISFIFO(os.lstat(self.file_path).st_mode):
                os.unlink(self.file_path)
        except OSError:
            pass

    def set_worker_pids(self, pids):
        """Only signal these workers and processes in their sessions (None: anyone but us, 0, 1)."""
        with self._cond:
            self._allowed = None if pids is None else frozenset(int(p) for p in pids)

    def pop_expired(self):
        """Timers that made the server signal a process since the last call: [(pid, scope, time)]."""
        with self._cond:
            out, self._expired = self._expired, []
        return out

    def active_timers(self):
        """A snapshot of the pending timers: sorted [(pid, scope_id, expiration_time)]."""
        with self._cond:
            return sorted((pid, scope, exp) for (pid, scope), (exp, _) in self._timers.items())

    def get_last_progress_time(self):
        return self._last_progress_time

    def _wait(self, predicate, timeout):
        """Wait until ``predicate()`` holds after a watchdog pass (for tests); returns its value."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # -- the watchdog thread
    def _make_fifo(self):
        try:
            st = os.lstat(self.file_path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISFIFO(st.st_mode):
                raise ValueError("timer file %s exists and is not a named pipe" % self.file_path)
            os.unlink(self.file_path)  # a stale pipe from an earlier run
        os.mkfifo(self.file_path, 0o600)

    def _loop(self):
        poller = select.poll()
        poller.register(self._fifo, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        pending = b""
        while not self._stopping:
            timeout = self._poll_timeout()
            try:
                events = poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
            except InterruptedError:
                events = []
            for fd, _ in events:
                if fd == self._fifo:
                    pending = self._read_requests(pending, poller)
                elif fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 512)
                    except OSError:
                        pass
                else:
                    self._process_exited(fd, poller)
            try:
                self._expire(time.time(), poller)
                if not self._use_pidfd:
                    self._drop_dead(poller)
            except Exception:  # the watchdog must outlive any single bad case
                log.exception("file timer: watchdog pass failed")
            with self._cond:
                self._last_progress_time = time.time()
                self._cond.notify_all()

    def _poll_timeout(self):
        with self._cond:
            if not self._timers:
                return None
            nearest = min(exp for exp, _ in self._timers.values())
        # Cap the sleep: the wall clock may jump, and without pidfds liveness is checked by polling.
        cap = 1.0 if self._use_pidfd else self.max_interval
        return min(max(0.0, nearest - time.time()), cap)

    def _read_requests(self, pending, poller):
        while True:
            try:
                chunk = os.read(self._fifo, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                self._handle_line(line, poller)
        if len(pending) > _MAX_PENDING:
            self._malformed(pending, "line too long")
            pending = b""
        return pending

    def _malformed(self, line, why):
        self._bad_lines += 1
        if self._bad_lines <= 100:  # a writer spewing garbage must not flood the agent's log
            log.warning("file timer: skipped a malformed request (%s): %r", why, line[:120])

    def _handle_line(self, line, poller):
        try:
            req = json.loads(line.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
            return self._malformed(line, "not JSON: %s" % e)
        if not isinstance(req, dict):
            return self._malformed(line, "not an object")
        pid, scope, exp, sig = (req.get("pid"), req.get("scope_id"), req.get("expiration_time"),
                                req.get("signal", 0))
        if req.get("version", 1) != 1:
            return self._malformed(line, "unsupported version")
        if not _is_int(pid) or not isinstance(scope, str) or not _is_int(sig) \
                or not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp != exp:
            return self._malformed(line, "missing or mistyped field")
        with self._cond:  # one step for observers: counted and applied together
            self._request_count += 1
            self._apply(pid, scope, float(exp), sig, poller)

    def _apply(self, pid, scope, exp, sig, poller):
        if exp < 0:
            self._timers.pop((pid, scope), None)
            if not any(p == pid for p, _ in self._timers):
                self._unwatch(pid, poller)
        elif pid <= 1 or pid == os.getpid():
            log.warning("file timer: refused a timer for pid %d (scope %s): never signalled", pid, scope)
        elif not self._watch(pid, poller):
            log.debug("file timer: pid %d is gone, ignored its timer %s", pid, scope)
        else:
            self._timers[(pid, scope)] = (exp, sig)

    def _watch(self, pid, poller):
        """Start watching pid's exit; False when it is already dead."""
        if not self._use_pidfd or pid in self._pidfds:
            return self._use_pidfd or _alive(pid)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as e:  # ENOSYS / EPERM (seccomp): fall back to polling liveness
            log.debug("file timer: pidfd_open unavailable (%s), polling liveness", e)
            self._use_pidfd = False
            return _alive(pid)
        self._pidfds[pid] = fd
        poller.register(fd, select.POLLIN)
        return True

    def _unwatch(self, pid, poller):
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            poller.unregister(fd)
            os.close(fd)

    def _process_exited(self, fd, poller):
        for pid, pfd in list(self._pidfds.items()):
            # Look again: this pass may have closed the pidfd the event was for and reused its number.
            if pfd == fd and select.select([fd], [], [], 0)[0]:
                self._drop_pid(pid, poller)
                log.debug("file timer: pid %d exited, dropped its timers", pid)

    def _drop_pid(self, pid, poller):
        with self._cond:
            for key in [k for k in self._timers if k[0] == pid]:
                del self._timers[key]
        self._unwatch(pid, poller)

    def _drop_dead(self, poller):
        with self._cond:
            pids = {pid for pid, _ in self._timers}
        for pid in pids:
            if not _alive(pid):
                self._drop_pid(pid, poller)

    def _may_signal(self, pid):
        allowed = self._allowed
        if allowed is None or pid in allowed:
            return True
        try:
            return os.getsid(pid) in allowed  # workers lead their own sessions
        except OSError:
            return False

    def _expire(self, now, poller):
        with self._cond:
            due = {}
            for (pid, scope), (exp, sig) in self._timers.items():
                if exp <= now:
                    due.setdefault(pid, []).append((exp, scope, sig))
        for pid, timers in due.items():
            timers.sort()
            exp, scope, sig = next((t for t in timers if t[2] > 0), timers[0])
            if sig <= 0:
                log.warning("file timer: pid %d overran scope %s (no signal requested)", pid, scope)
                with self._cond:
                    for _, s, _ in timers:
                        self._timers.pop((pid, s), None)
                continue
            if not self._may_signal(pid):
                log.warning("file timer: pid %d overran scope %s but is not a worker of this agent; "
                            "not signalled", pid, scope)
                self._drop_pid(pid, poller)
                continue
            record = (pid, scope, exp)
            with self._cond:  # recorded first: the agent may see the death before we return
                self._expired.append(record)
            sent = self._signal(pid, sig)
            if not sent:
                with self._cond:
                    if record in self._expired:
                        self._expired.remove(record)
            log.warning("file timer: pid %d overran scope %s by %.3fs; %s %s", pid, scope, now - exp,
                        "sent" if sent else "could not send", _signal_name(sig))
            self._drop_pid(pid, poller)

    def _signal(self, pid, sig):
        fd = self._pidfds.get(pid)
        try:
            if fd is not None:  # race-free: the pidfd cannot name a recycled pid
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False
        except OSError as e:
            log.error("file timer: cannot signal pid %d: %s", pid, e)
            return False


def _file_timer_path(environ, directory):
    """The FIFO the agent's file timer should serve, or None when the timer is off.

    On when ``TORCHELASTIC_TIMER_FILE`` names a path (used as given) or when
    ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` (then ``directory/timer.fifo``; give it a local directory
    such as the agent's temporary run folder: some network file systems refuse FIFOs).
    """
    path = environ.get("TORCHELASTIC_TIMER_FILE")
    if path:
        return path
    if environ.get("TORCHELASTIC_ENABLE_FILE_TIMER") == "1":
        return os.path.join(directory, "timer.fifo")
    return None


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0), but it is dead for us
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _signal_name(sig):
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "signal %d" % sig


# ----------------------------------------------------------------------------- health check

class _HealthHandler(http.server.BaseHTTPRequestHandler):
    server_version = "elasticrun"
    timeout = 10  # a client that connects and says nothing does not hold a thread for ever

    def do_GET(self):
        if self.path.split("?", 1)[0] != "/healthz":
            return self._reply(404, {"error": "not found: try GET /healthz"})
        try:
            healthy, status = self.server.status_fn()
            body = dict(status)
            body["healthy"] = bool(healthy)
        except Exception as e:  # a broken status callback is an unhealthy agent, not a dead server
            healthy, body = False, {"healthy": False, "error": "%s: %s" % (type(e).__name__, e)}
        self._reply(200 if healthy else 503, body)

    def _reply(self, code, body):
        data = (json.dumps(body, default=str, sort_keys=True) + "\n").encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def address_string(self):  # never a reverse lookup
        return str(self.client_address[0])

    def log_message(self, fmt, *args):
        log.debug("healthz: %s %s", self.address_string(), fmt % args)


class _HealthHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup: bind without it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


def _health_status_fn(agent):
    """``status_fn`` for ``_HealthServer`` reading an agent's public fields (no locks needed)."""
    def status():
        state = agent.state
        return state in ("HEALTHY", "SUCCEEDED"), {
            "state": state,
            "restart_count": agent.restart_count,
            "group_rank": agent.group_rank,
            "world_size": agent.group_world_size,
            "last_progress_time": agent.last_progress_time,
        }
    return status


class _HealthServer:
    """``GET /healthz`` on ``port`` (0: a free one, read back from ``.port`` after ``start()``).

    ``status_fn() -> (healthy, {"state", "restart_count", "group_rank", "world_size",
    "last_progress_time", ...})`` runs on the server's thread for each request, so it must only read
    the agent's state (no locks held long). Answers 200 when healthy, else 503; JSON either way.
    """

    def __init__(self, port, status_fn, host="0.0.0.0"):
        self.host = host
        self.port = int(port)
        self.status_fn = status_fn
        self._server = None
        self._thread = None

    def start(self):
        cls = _HealthHTTPServer
        if ":" in self.host:
            cls = type("_HealthHTTPServer6", (_HealthHTTPServer,), {"address_family": socket.AF_INET6})
        self._server = cls((self.host, self.port), _HealthHandler)
        self._server.status_fn = self.status_fn
        self._server.timeout = 0  # handle_request() below only runs when a connection is waiting
        self.port = self._server.server_address[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="elastic-healthz", daemon=True)
        self._thread.start()
        log.info("health check on http://%s:%d/healthz", self.host, self.port)

    def _serve(self):
        # Our own loop instead of serve_forever(): that one polls for shutdown every poll_interval,
        # this one sleeps until a client or stop() wakes it, so stop() returns at once.
        with selectors.DefaultSelector() as sel:
            sel.register(self._server, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = sel.select()
                if any(key.fileobj is self._wake_r for key, _ in ready):
                    return
                self._server.handle_request()  # accepts and hands the connection to a thread

    def stop(self):
        server, self._server = self._server, None
        if server is None:
            return
        self._wake_w.send(b"x")
        self._thread.join()
        server.server_close()
        self._wake_r.close()
        self._wake_w.close()
        self._thread = None


# ----------------------------------------------------------------------------- Slurm

_SLURM_PORT = 29400


def _parse_hostlist(text):
    """Expand a Slurm host list: ``"gpu[001-003,010],cpu7"`` -> gpu001 gpu002 gpu003 gpu010 cpu7.

    Several bracket groups in one name multiply (``a[1-2]-b[3-4]`` -> a1-b3 a1-b4 a2-b3 a2-b4); zero
    padding follows the range's first number. Raises ``ValueError`` on a malformed list.
    """
    hosts = []
    for item in _split_top(text.strip(), text):
        parts = re.split(r"(\[[^\[\]]*\])", item)
        names = [""]
        for part in parts:
            if part.startswith("["):
                choices = _expand_ranges(part[1:-1], text)
            elif "[" in part or "]" in part:
                raise ValueError("malformed Slurm host list %r: unbalanced brackets" % text)
            else:
                choices = [part]
            names = [n + c for n in names for c in choices]
        hosts.extend(names)
    return hosts


def _split_top(s, text):
    """Split on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError("malformed Slurm host list %r: nested brackets" % text)
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("malformed Slurm host list %r: unbalanced brackets" % text)
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    if depth:
        raise ValueError("malformed Slurm host list %r: unbalanced brackets" % text)
    items.append(s[start:])
    items = [x.strip() for x in items]
    if s and not all(items):
        raise ValueError("malformed Slurm host list %r: empty host name" % text)
    return [x for x in items if x]


def _expand_ranges(spec, text):
    out = []
    for r in spec.split(","):
        r = r.strip()
        m = re.match(r"^(\d+)(?:-(\d+))?$", r)
        if not m:
            raise ValueError("malformed Slurm host list %r: bad range %r" % (text, r))
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError("malformed Slurm host list %r: range %r runs backwards" % (text, r))
        if int(hi) - int(lo) >= 1 << 20:
            raise ValueError("malformed Slurm host list %r: range %r is too large" % (text, r))
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _is_loopback_name(host):
    h = host.strip("[]").lower()
    return (h in ("localhost", "localhost.localdomain", "ip6-localhost", "::1", "0.0.0.0", "::")
            or h.startswith("127.") or h.startswith("::ffff:127.") or h.endswith(".localhost"))


def _slurm_options(environ):
    """Launcher options from srun's environment: nnodes, node_rank, rdzv_endpoint/id/backend.

    No name is resolved. Raises ``ValueError`` (one sentence) outside srun, and for a multi-node job
    whose first node is a loopback address, where every node would rendezvous with itself.
    """
    def get(*names):
        for name in names:
            value = environ.get(name)
            if value not in (None, ""):
                return name, value
        return names[0], None

    _, job = get("SLURM_JOB_ID", "SLURM_JOBID")
    if job is None:
        raise ValueError("--slurm needs Slurm's environment, but SLURM_JOB_ID is not set: "
                         "launch with `srun elasticrun --slurm ...`")
    values = {}
    for key, names in (("nnodes", ("SLURM_STEP_NUM_NODES", "SLURM_NNODES")),
                       ("node_rank", ("SLURM_NODEID",)),
                       ("nodelist", ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))):
        name, value = get(*names)
        if value is None:
            raise ValueError("--slurm: %s is not set; launch with `srun elasticrun --slurm ...` "
                             "(one task per node)" % name)
        values[key] = (name, value)
    try:
        nnodes, node_rank = int(values["nnodes"][1]), int(values["node_rank"][1])
    except ValueError:
        raise ValueError("--slurm: %s=%r and %s=%r must be integers" % (values["nnodes"] + values["node_rank"]))
    hosts = _parse_hostlist(values["nodelist"][1])
    if not hosts or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError("--slurm: inconsistent Slurm environment (%d nodes, node id %d, node list %r)"
                         % (nnodes, node_rank, values["nodelist"][1]))
    _, step = get("SLURM_STEP_ID", "SLURM_STEPID")
    if step is None and nnodes > 1:
        raise ValueError("--slurm: this runs in the batch script of a %d-node job, not under srun, "
                         "so only one node would join: launch with `srun elasticrun --slurm ...`" % nnodes)
    host = hosts[0]
    if nnodes > 1 and _is_loopback_name(host):
        raise ValueError("--slurm: the rendezvous endpoint %s is a loopback address but the job has %d "
                         "nodes, so every node would rendezvous with itself; fix the node names "
                         "or pass --rdzv-endpoint" % (host, nnodes))
    return {
        "nnodes": str(nnodes),
        "node_rank": node_rank,
        "rdzv_endpoint": "%s:%d" % ("[%s]" % host if ":" in host else host, _SLURM_PORT),
        "rdzv_id": job if step is None else "%s.%s" % (job, step),
        "rdzv_backend": "c10d",
    }
