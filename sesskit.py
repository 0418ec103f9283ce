#!/usr/bin/env python3
"""sesskit: server-side sessions that never lose a write.

One stdlib-only module for scripts, CGI programs and multi-process WSGI servers::

    import sesskit
    with sesskit.open_session(sid_from_cookie) as s:    # load (or create), save on clean exit
        s["visits"] = s.get("visits", 0) + 1

Guarantees, each explained where it is implemented:

* Concurrent requests of one session lose nothing: in the default ``lock="merge"`` mode only the keys a
  block changed are applied, under the session's own lock, to the record as it is at write-back time.
  ``lock="exclusive"`` serialises the requests of one session; ``lock="read"`` is a read-only snapshot.
* Locks are per session and are the operating system's own file locks, so they die with a killed process.
* A reader never sees a half-written session and a process killed at any instant leaves every session
  loadable with its old or its new content.
* Session ids are unique by construction (time, host, process, counter) and unguessable (144 random bits;
  120 fresh ones in an id a Redis store rotates to); an incoming id that is malformed, unknown or expired
  is never adopted.
"""

__version__ = "0.1.0"
__license__ = "MIT"
__all__ = [
    "DEFAULTS", "SesskitError", "LockTimeout", "InvalidSessionId", "ReadOnlySession",
    "SessionTooLarge", "ContainerError", "StoreUnavailable", "LockLost", "new_session_id",
    "is_valid_session_id", "Record",
    "Container", "MemoryContainer", "FileContainer", "SQLiteContainer", "LMDBContainer",
    "RedisContainer", "open_store", "Session", "open_session", "SessionMiddleware",
]

###############################################################################
# Imports #####################################################################
###############################################################################

import _thread
import binascii
import errno
import itertools
import json
import os
import stat
import struct
import sys
import time
import zlib
from collections.abc import MutableMapping

###############################################################################
# Constants & defaults ########################################################
###############################################################################

#: Tunables, with their units. ``open_session`` and the containers read them when an argument is None.
DEFAULTS = {
    "timeout": 1800.0,          # seconds of inactivity after which a session expires (sliding)
    "max_age": 0.0,             # seconds after creation after which a session expires anyway; 0 = never
    "lock_timeout": 10.0,       # seconds to wait for a session's lock before LockTimeout
    "poll_interval": 0.005,     # seconds, the longest sleep between two tries of a busy lock
    "max_size": 1 << 20,        # bytes of serialised session data at most (SessionTooLarge beyond)
    "touch_interval": 60.0,     # seconds: expiry is pushed forward on a read at most this often
    "reap_interval": 300.0,     # seconds between two opportunistic reaps of one store (0 = never)
    "reap_budget": 0.05,        # seconds an opportunistic reap may take before it stops and resumes later
    "reap_margin": 300.0,       # seconds a session stays after its expiry before a reaper may remove it
                                # (the clock skew between processes and hosts that the store tolerates)
    "max_depth": 64,            # nesting depth of lists and dicts a session value may have (TypeError beyond)
    "durable": False,           # fsync file and directory on every write (survives power loss)
    "sqlite_busy_timeout": 5.0,  # seconds SQLite waits for its write lock before "database is locked"
    "sqlite_cache_kib": 16384,  # KiB of page cache per SQLite connection (one per thread)
    "lmdb_map_size": 1 << 30,   # bytes of address space LMDB maps at first; doubled whenever it is full
    "lmdb_max_readers": 1024,   # concurrent LMDB read transactions over all processes (set at creation)
    "redis_lease": 5.0,         # seconds a Redis session lock outlives a holder that stopped renewing it
    "redis_socket_timeout": 5.0,  # seconds to connect to Redis, and to wait for one reply
    "redis_wait_timeout": 1.0,  # seconds a write waits for its replicas (``replicas=``; at most half
                                # the socket timeout)
}

#: The lock modes of ``open_session``.
LOCK_MODES = ("merge", "exclusive", "read")

###############################################################################
# Exceptions ##################################################################
###############################################################################


class SesskitError(Exception):
    """Root of every error sesskit raises on purpose."""


class LockTimeout(SesskitError, TimeoutError):
    """A session's lock could not be acquired within the lock timeout."""


class InvalidSessionId(SesskitError, ValueError):
    """A session id was given where a valid one is required (container API, CLI)."""


class ReadOnlySession(SesskitError, TypeError):
    """A session opened with ``lock="read"`` was written to."""


class SessionTooLarge(SesskitError, ValueError):
    """The serialised session is larger than its ``max_size``; nothing was stored."""


class ContainerError(SesskitError, OSError):
    """A storage backend failed, or refused an unsafe configuration; the stored data is unchanged."""


class StoreUnavailable(ContainerError):
    """The session server could not be reached or refused the command (connection refused or lost, a
    timeout, a failover in progress: READONLY, LOADING, MASTERDOWN; out of memory: OOM). Whether the
    failed write was applied is unknown only when the connection broke after it was sent; it is then
    applied completely or not at all."""


class LockLost(LockTimeout):
    """An exclusive block's lock lease ran out (its process was paused, or the server unreachable,
    longer than the lease) and another request may have taken the lock: the write was refused."""


###############################################################################
# Utilities: JSON, clock ######################################################
###############################################################################

# One encoder, built once: json.dumps() with options builds a new encoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
# What _encode does with a str, without its per-call overhead (session keys, string values).
_encode_str = json.encoder.encode_basestring_ascii
_decode = json.loads


def _fast_json():
    """Return (decode, encode) made once from json's C accelerators, for containers and merges.

    json.loads and JSONEncoder.encode set up a scanner or encoder on every call, which is most of their
    cost on a small session (measured here: decode 2.6 -> 0.5 us, encode 4.3 -> 2.5 us). These two are
    only for text a container wrote itself (no check for trailing data) and values that Session has
    already encoded once with _encode_data (no check for circular references); they produce the same
    text as _encode. Without the accelerators they are _decode and _encode.
    """
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    make_scanner = getattr(json.scanner, "c_make_scanner", None)
    if make_encoder is None or make_scanner is None:  # pragma: no cover - PyPy, or a build without them
        return _decode, _encode

    def refuse(value):
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
    try:   # private constructors: should a Python release change them, use the plain functions
        encoder = make_encoder(None, refuse, _encode_str, None, ":", ",", False, False, False)
        scanner = make_scanner(json.JSONDecoder())
        if "".join(encoder({"a": [1, 2.5, None]}, 0)) != '{"a":[1,2.5,null]}':
            raise ValueError("unexpected output")
    except (TypeError, ValueError):  # pragma: no cover
        return _decode, _encode

    def decode(text):
        try:
            return scanner(text, 0)[0]
        except StopIteration:                 # not text we wrote: let json.loads parse it or explain
            return _decode(text)
    return decode, (lambda value: "".join(encoder(value, 0)))


_decode_fast, _encode_fast = _fast_json()


def _check_json(key, value):
    """Return the JSON text of ``value``; raise TypeError naming ``key`` if it is not JSON."""
    if type(value) is str:
        return _encode_str(value)
    try:
        text = _encode_fast(value)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = _nesting_problem(value, DEFAULTS["max_depth"]) if type(exc) is RecursionError else None
        if problem is None:
            problem = f"value {type(value).__name__} is not JSON serialisable ({exc})"
        raise TypeError(f"session key {key!r}: {problem}") from None
    # Walk the value only when it may hold a dict (or a brace in a string), to check its keys, or enough
    # brackets to nest too deep: a cheap test of the text spares the walk for most values.
    if type(value) in _SCALARS:
        return text
    if "{" in text or text.count("[") > DEFAULTS["max_depth"]:
        problem = _nesting_problem(value, DEFAULTS["max_depth"])
        if problem is not None:
            raise TypeError(f"session key {key!r}: {problem}")
    return text


def _encode_data(data):
    """Encode a session dict, naming the first key whose value is not JSON (dict keys that are not
    strings included, at any depth: an in-place edit may have put one there after the value was set)."""
    try:
        text = _encode(data)
    except (TypeError, ValueError, RecursionError):
        text = None
    if text is None or "{" in text[1:] or text.count("[") > DEFAULTS["max_depth"]:
        for key, value in data.items():
            if type(key) is not str:
                raise TypeError(f"session keys must be str, not {type(key).__name__}: {key!r}") from None
            if type(value) not in _SCALARS:
                _check_json(key, value)
    if text is None:
        raise TypeError("session data is not JSON serialisable")
    return text


#: At most this many new keys are appended to a stored session as text, each after one search of it.
_MERGE_SCANS = 8


def _merge_data(text, changed, deleted, base=None):
    """Apply ``changed`` (key -> value) and ``deleted`` (keys) to the JSON object ``text``.

    Two shortcuts avoid decoding and re-encoding a big session. Keys that ``text`` does not hold are
    appended to it as text: a key is certainly absent when its encoded form followed by ":" occurs
    nowhere in ``text`` (an occurrence inside a string value only costs the shortcut). That search scans
    ``text`` once per key, so it is tried for at most ``_MERGE_SCANS`` new keys; more go through one
    decode instead, and a merge costs O(changed keys + session size) either way (it runs under the
    session's lock: 30,000 new keys used to hold a 600 KB session's lock for seconds, issue 9). And when
    ``base`` is ``(text the caller loaded, the caller's complete dict)`` and the stored text has not
    changed since, the result is simply the caller's dict.
    """
    if not changed and not deleted:
        return text
    if not deleted and len(changed) <= _MERGE_SCANS and text[-1:] == "}":
        items = []
        for key, value in changed.items():
            key_text = _encode_str(key)
            if key_text + ":" in text:
                break
            items.append(f"{key_text}:{_encode_fast(value)}")
        else:
            return f"{text[:-1]}{'' if text == '{}' else ','}{','.join(items)}}}"
    if base is not None and text == base[0]:
        return _encode_fast(base[1])
    data = _decode_fast(text)
    data.update(changed)
    for key in deleted:
        data.pop(key, None)
    return _encode_fast(data)


_MISSING = object()
_SCALARS = frozenset((str, int, float, bool, type(None)))     # JSON values that cannot change in place


def _nesting_problem(value, limit):
    """Why the JSON value ``value`` cannot be stored, or None.

    * A dict key inside that is not a str: json would silently turn it into a string (so
      {1: "a", "1": "b"} would store one key twice and lose a value on load).
    * Lists and dicts nested more than ``limit`` deep (``value`` itself is level 1). Decoding recurses
      once per level, on the caller's stack: a value that a shallow stack stored (json manages about
      990 levels) would raise RecursionError when loaded deeper in an application's stack, and the
      session could never be loaded again. ``DEFAULTS["max_depth"]`` (64) leaves that stack room.

    Iterative, so a deep value cannot exhaust the stack here either.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)) and depth > limit:
            return (f"the value nests lists and dicts more than {limit} deep "
                    f"(DEFAULTS['max_depth']); a session must load at any stack depth")
        if isinstance(item, dict):
            for key, inner in item.items():
                if type(key) is not str:
                    return f"a dict inside has the key {key!r}; JSON keys are strings only"
                if type(inner) not in _SCALARS:
                    stack.append((inner, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((inner, depth + 1) for inner in item if type(inner) not in _SCALARS)
    return None


def _short(sid):
    """A session id shortened for messages and logs (never log whole ids: they are credentials)."""
    return f"{sid[:6]}…" if isinstance(sid, str) else repr(sid)[:12]


###############################################################################
# OS file locking #############################################################
###############################################################################
# The only OS-specific code of the module. POSIX uses flock(2): the lock belongs to the open file
# description, so two open() calls exclude each other even inside one process (threads), the kernel drops
# it when the last descriptor closes (a killed process), and it does not mix with the fcntl/lockf record
# locks that SQLite uses internally. Windows gets msvcrt.locking on byte 0, which behaves the same way for
# what we need (one exclusive, non-blocking attempt per descriptor).

if os.name == "nt":  # pragma: no cover - POSIX is what the tests prove
    import msvcrt

    _O_NOFOLLOW = 0
    _O_CLOEXEC = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)

    def _try_lock(fd):
        """Try once to take the exclusive lock of ``fd``; return whether we got it."""
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd):
        """Release the lock of ``fd`` (the descriptor stays open)."""
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    _O_NOFOLLOW = os.O_NOFOLLOW
    _O_CLOEXEC = os.O_CLOEXEC
    _CONTENDED = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)

    def _try_lock(fd):
        """Try once to take the exclusive lock of ``fd``; return whether we got it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _CONTENDED:
                return False
            raise
        return True

    def _unlock(fd):
        """Release the lock of ``fd`` (the descriptor stays open)."""
        fcntl.flock(fd, fcntl.LOCK_UN)


def _wait_lock(fd, timeout, what):
    """Take the exclusive lock of ``fd``, waiting at most ``timeout`` seconds (None: forever).

    Polls with a growing sleep (0.2 ms up to ``DEFAULTS["poll_interval"]``) so that a lock held for
    microseconds, the common case in merge mode, is picked up quickly. Raises LockTimeout naming ``what``.
    """
    if _try_lock(fd):
        return
    if timeout is not None and timeout <= 0:
        raise LockTimeout(f"{what} is locked by another request (not waiting)")
    deadline = None if timeout is None else time.monotonic() + timeout
    delay, longest = 0.0002, DEFAULTS["poll_interval"]
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"{what} is still locked after {timeout:g} s; the request holding "
                                  f"it is slow or stuck (raise lock_timeout, or use lock='merge')")
            time.sleep(min(delay, left))
        else:
            time.sleep(delay)
        if _try_lock(fd):
            return
        delay = min(delay * 2, longest)


###############################################################################
# Session ids #################################################################
###############################################################################
# 33 bytes, base64url-encoded to 44 characters of [A-Za-z0-9_-]:
#   18 bytes  os.urandom         144 bits of secrecy, first so that id prefixes spread files evenly
#    6 bytes  time in ms         with the next three fields: unique by construction
#    3 bytes  host tag           CRC-32 of the host name (the name itself is not revealed)
#    3 bytes  process id         (Linux pids fit in 22 bits)
#    3 bytes  per-process counter
# Two generators differ in host, pid or time, and one process never repeats a counter value within a
# millisecond, so no two ids collide without a CSPRNG failure. A forked child has a new pid, so it cannot
# repeat its parent's ids even though it inherits the counter; os.urandom is fork-safe by construction.

SID_LENGTH = 44
_SID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_sid_counter = itertools.count()
_host_tag = None


def _host_bytes():
    global _host_tag
    if _host_tag is None:
        name = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")
        _host_tag = struct.pack(">I", zlib.crc32(name.encode("utf-8", "replace")))[1:]
    return _host_tag


def new_session_id() -> str:
    """Return a new session id: 44 URL- and cookie-safe characters, unique and unguessable.

    Thread-safe and fork-safe; it touches no store.
    """
    raw = b"".join((
        os.urandom(18),
        struct.pack(">Q", time.time_ns() // 1_000_000)[2:],
        _host_bytes(),
        struct.pack(">I", os.getpid() & 0xFFFFFF)[1:],
        struct.pack(">I", next(_sid_counter) & 0xFFFFFF)[1:],
    ))
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).decode("ascii")


# A rotated id may keep the first characters of the id it replaces (Container.new_id): Redis Cluster
# needs every key a rotation writes in one hash slot, and a load of the new id finds its key from the
# id alone, so the slot must be readable from the id (RedisContainer keeps 4 characters). Whole
# characters of the random part are kept, never the unique tail: 4 characters are exactly the first
# 3 random bytes, so the new id still has 120 fresh random bits (more than the 64 OWASP asks of a
# whole id) and its time/host/pid/counter stay its own, so it is unique as any other. Someone who knew
# the old id (session fixation, the threat rotation exists for) learns those 24 bits and must still
# guess 120. Only a container that needs it asks for it; the others rotate to wholly fresh ids.


def _rotated_session_id(previous, keep):
    """A new id whose first ``keep`` characters (a multiple of 4: whole bytes of the random part) are
    ``previous``'s, the rest fresh from ``new_session_id()``."""
    if keep % 4 or not 0 <= keep <= 24:
        raise ValueError("keep whole random bytes: 0, 4, ... or 24 characters")
    return _require_sid(previous)[:keep] + new_session_id()[keep:]


def is_valid_session_id(sid) -> bool:
    """Tell whether ``sid`` has the exact form of an id made by ``new_session_id()``.

    This is checked before anything else touches an incoming id, so a hostile value (path traversal,
    NUL bytes, 10 KB strings, non-ASCII) never reaches a file name or a database key.
    """
    return type(sid) is str and len(sid) == SID_LENGTH and not sid.strip(_SID_ALPHABET)


def _require_sid(sid):
    if not is_valid_session_id(sid):
        raise InvalidSessionId(f"not a sesskit session id: {_short(sid)}")
    return sid


###############################################################################
# Containers ##################################################################
###############################################################################


class Record:
    """One stored session as a container returns it.

    ``data`` is the JSON text of the session dict; ``created`` and ``expires`` are wall-clock epoch
    seconds; ``timeout`` is the sliding inactivity timeout and ``max_age`` the absolute lifetime (0: none)
    the session was created with; ``forward`` is None for a live session.

    A record whose ``forward`` is set is a *tombstone*: the session was rotated to the id ``forward``
    (``Session.regenerate``). Its ``created`` is the time of the rotation and its ``timeout`` the grace
    period: until ``created + timeout`` the old id forwards to the new one (``forwards``); after that and
    until ``expires`` it is only remembered, so that a late request with the old id is told apart from
    an unknown id (it gets an empty session whose writes are dropped, and no cookie). Its data is "{}".
    """

    __slots__ = ("data", "created", "expires", "timeout", "max_age", "forward")

    def __init__(self, data, created, expires, timeout, max_age=0.0, forward=None):
        self.data = data
        self.created = created
        self.expires = expires
        self.timeout = timeout
        self.max_age = max_age
        self.forward = forward

    def replace(self, data=_MISSING, expires=_MISSING):
        """Return a copy with ``data`` and/or ``expires`` changed."""
        return Record(self.data if data is _MISSING else data, self.created,
                      self.expires if expires is _MISSING else expires, self.timeout, self.max_age,
                      self.forward)

    def writable(self, now):
        """Whether a write-back, touch or rotation may change this record at ``now``: only a live
        session may. A tombstone or an expired record is never written again (no resurrection)."""
        return self.forward is None and self.expires >= now

    def forwards(self, now):
        """Whether this is a tombstone still inside its grace period at ``now``."""
        return self.forward is not None and now < self.created + self.timeout and now <= self.expires

    @staticmethod
    def tombstone(new_sid, now, grace, remember):
        """The record an id rotated to ``new_sid`` at ``now`` leaves behind: it forwards for ``grace``
        seconds and is remembered for ``remember`` seconds (at least the grace)."""
        return Record("{}", now, now + max(grace, remember), float(grace), 0.0, new_sid)

    def __repr__(self):
        return (f"Record(created={self.created:.3f}, expires={self.expires:.3f}, timeout={self.timeout:g}, "
                f"max_age={self.max_age:g}, forward={self.forward and _short(self.forward)}, "
                f"{len(self.data)} bytes)")


class Container:
    """The storage protocol. Containers only store; every policy lives once, in ``Session``.

    Every method takes a valid session id (``is_valid_session_id``) and is safe to call from many threads
    and processes at once. Expiry is decided by the caller's clock: containers compare against the ``now``
    they are given and never drop a record on their own except in ``reap``.

    * ``load(sid)`` returns the stored ``Record`` or None (absent or unreadable). It takes no lock and
      never sees a half-written record.
    * ``create(sid, record)`` stores a record under a fresh id that is not stored yet.
    * ``update(sid, changed, deleted, meta, now, held=None)`` is the write-back of merge and exclusive
      modes. Under the session's exclusive lock (``held`` when the caller already holds it) it re-reads
      the record and, unless it is missing, a tombstone or expired at ``now`` (then it writes nothing and
      returns False: a late write-back never resurrects a session), applies ``changed`` (key -> JSON
      value) and ``deleted`` (keys) to it, takes ``created``/``expires``/``timeout``/``max_age``/
      ``forward`` from ``meta`` and writes it atomically. Returns True when written. ``base``, when
      given, is ``(data text the caller loaded, the caller's complete dict)``: a hint that lets a
      container skip decoding when the stored data has not changed since (``_merge_data`` uses it).
    * ``rotate(old, new, changed, deleted, meta, tombstone, now, held=None, base=None)`` moves a session
      to a new id in one atomic step: unless ``old``'s record is not ``writable(now)`` (then it writes
      nothing and returns False), it applies ``changed``/``deleted`` to it as ``update`` does, stores
      the result under the fresh id ``new`` with the metadata of ``meta``, and replaces ``old`` by
      ``tombstone`` (a ``Record.tombstone``; None: delete ``old``). No write-back of ``old`` can land
      between these steps (one transaction, or under ``old``'s lock, which ``held`` is when the caller
      holds it). Returns True when done.
    * ``touch(sid, expires, timeout=None, now=None, held=None)`` pushes a record's expiry forward to
      ``expires`` without rewriting its data. It does nothing to a missing record, to a record that is
      not ``writable(now)`` (a touch never revives a session, and a rotated id dies when its grace ends)
      and, when ``timeout`` is given, to a record whose stored timeout is another one (a concurrent
      request changed it, and a stale touch must not undo that). ``held`` is the session's lock when
      the caller holds it (exclusive mode): the touch then happens under it. Returns True when it moved
      the expiry (the caller then refreshes the client's cookie, and only then).
    * ``delete(sid, held=None)`` removes a record, under its lock. When the record is a tombstone, the
      session it forwards to is removed in the same step (one hop): a logout that raced a rotation
      (it loaded the session just before another request rotated it) still ends the session.
    * ``lock(sid, timeout)`` returns a held lock of a stored session (a context manager releasing it),
      or None when the session is not stored. Raises LockTimeout. Locks are not reentrant.
    * ``reap(now=None, budget=None, interval=0)`` removes expired records; one reaper runs at a time per
      store (others return 0 at once), a ``budget`` in seconds bounds one call (the next resumes), and
      with ``interval`` the call does nothing if a reap of this store started less than that long ago.
      Returns the number of records removed.
    * ``count(now=None)`` and ``sids(now=None)`` count and list unexpired records (ids remembered
      after a rotation included, until they expire); ``close()`` frees handles (the container stays
      usable and reopens them on demand).
    * ``new_id(previous)`` returns the fresh id ``Session.regenerate`` rotates ``previous`` to; it
      touches no store. The default is ``new_session_id()``; a container whose ``rotate`` needs the two
      ids related says so here (RedisContainer keeps the Redis Cluster hash tag). A container that
      wraps another must pass this call on.
    """

    #: Set by ``open_session``: the earliest wall time at which this process may reap again.
    _next_reap = 0.0

    def load(self, sid):
        raise NotImplementedError

    def create(self, sid, record):
        raise NotImplementedError

    def update(self, sid, changed, deleted, meta, now, held=None, base=None):
        raise NotImplementedError

    def rotate(self, old, new, changed, deleted, meta, tombstone, now, held=None, base=None):
        raise NotImplementedError

    def touch(self, sid, expires, timeout=None, now=None, held=None):
        raise NotImplementedError

    def delete(self, sid, held=None):
        raise NotImplementedError

    def lock(self, sid, timeout):
        raise NotImplementedError

    def reap(self, now=None, budget=None, interval=0.0):
        raise NotImplementedError

    def count(self, now=None):
        return sum(1 for _ in self.sids(now))

    def new_id(self, previous):
        return new_session_id()

    def sids(self, now=None):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# Memory ----------------------------------------------------------------------


class _MemoryLock:
    """A held per-session lock of a MemoryContainer."""

    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def release(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


class MemoryContainer(Container):
    """Sessions in a dict of this process: for tests, development and single-process servers.

    Thread-safe; per-session locks are ``threading.Lock`` objects. Nothing is shared with other processes
    (a forked child gets a copy) and nothing survives the process.
    """

    def __init__(self):
        import threading
        self._records = {}
        self._locks = {}
        self._mutex = threading.Lock()
        self._new_lock = threading.Lock
        self._reaping = threading.Lock()
        self._last_reap = float("-inf")

    def __reduce__(self):
        return (MemoryContainer, ())

    def _session_lock(self, sid):
        with self._mutex:
            lock = self._locks.get(sid)
            if lock is None:
                lock = self._locks[sid] = self._new_lock()
            return lock

    def _acquire(self, sid, timeout):
        lock = self._session_lock(sid)
        if not lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            raise LockTimeout(f"session {_short(sid)} is still locked after {timeout:g} s")
        return _MemoryLock(lock)

    def load(self, sid):
        return self._records.get(sid)

    def create(self, sid, record):
        with self._mutex:
            if sid in self._records:
                raise ContainerError(f"session {_short(sid)} exists already")
            self._records[sid] = record

    def update(self, sid, changed, deleted, meta, now, held=None, base=None):
        handle = held or self._acquire(sid, DEFAULTS["lock_timeout"])
        try:
            current = self._records.get(sid)
            if current is None or not current.writable(now):
                return False
            self._records[sid] = meta.replace(data=_merge_data(current.data, changed, deleted, base))
            return True
        finally:
            if held is None:
                handle.release()

    def rotate(self, old, new, changed, deleted, meta, tombstone, now, held=None, base=None):
        handle = held or self._acquire(old, DEFAULTS["lock_timeout"])
        try:
            current = self._records.get(old)
            if current is None or not current.writable(now):
                return False
            record = meta.replace(data=_merge_data(current.data, changed, deleted, base))
            with self._mutex:
                if new in self._records:
                    raise ContainerError(f"session {_short(new)} exists already")
                self._records[new] = record
                if tombstone is None:
                    del self._records[old]
                else:
                    self._records[old] = tombstone
            return True
        finally:
            if held is None:
                handle.release()

    def touch(self, sid, expires, timeout=None, now=None, held=None):
        """Under the session's lock like every other write (taken without waiting: a busy session is
        being written, which moves its expiry anyway), so a touch never brings back a record that a
        delete or rotation removed meanwhile."""
        if held is None:
            try:
                handle = self._acquire(sid, 0)
            except LockTimeout:
                return False
        try:
            current = self._records.get(sid)
            if (current is not None and current.writable(now if now is not None else current.expires)
                    and current.expires < expires and (timeout is None or current.timeout == timeout)):
                self._records[sid] = current.replace(expires=expires)
                return True
            return False
        finally:
            if held is None:
                handle.release()

    def delete(self, sid, held=None):
        handle = held or self._acquire(sid, DEFAULTS["lock_timeout"])
        try:
            record = self._records.pop(sid, None)
            if record is not None and record.forward is not None:
                with self._acquire(record.forward, DEFAULTS["lock_timeout"]):
                    self._records.pop(record.forward, None)
        finally:
            if held is None:
                handle.release()

    def lock(self, sid, timeout):
        if sid not in self._records:
            return None
        handle = self._acquire(sid, timeout)
        if sid not in self._records:
            handle.release()
            return None
        return handle

    def reap(self, now=None, budget=None, interval=0.0):
        now = time.time() if now is None else now
        if not self._reaping.acquire(blocking=False):
            return 0
        try:
            if interval and now - self._last_reap < interval:
                return 0
            self._last_reap = now
            removed = 0
            for sid in [sid for sid, rec in list(self._records.items())
                        if rec.expires < now - DEFAULTS["reap_margin"]]:
                lock = self._session_lock(sid)
                if not lock.acquire(blocking=False):
                    continue
                try:
                    rec = self._records.get(sid)
                    if rec is not None and rec.expires < now - DEFAULTS["reap_margin"]:
                        del self._records[sid]
                        removed += 1
                finally:
                    lock.release()
                with self._mutex:
                    if sid not in self._records and not lock.locked():
                        self._locks.pop(sid, None)
            return removed
        finally:
            self._reaping.release()

    def sids(self, now=None):
        now = time.time() if now is None else now
        return [sid for sid, rec in list(self._records.items()) if rec.expires >= now]


# File --------------------------------------------------------------------------
# Layout: ROOT/<first two characters of the id>/<id>, one file per session. The id's first characters are
# random, so 4,096 sub-directories share the files evenly (about 250 each at a million sessions).
#
# A session file holds two slots and is rewritten in place, never renamed on an ordinary write:
#
#     header  16 bytes   b"SSK1", slot capacity (uint32 LE), 8 reserved bytes
#     slot 0  at 16          seq (uint64), length (uint32), CRC-32 of seq+length+payload, payload
#     slot 1  at 16 + cap    the same
#
# A write goes, under the session's lock, into the slot that does not hold the newest valid record, with a
# higher sequence number. A reader takes the valid slot with the highest sequence. A process killed
# half-way through a write (or a reader racing it) meets a slot whose CRC fails, and falls back to the
# other slot, which holds the previous record: old or new content, never a mix. This costs one pwrite per
# save instead of the temporary file and rename whose data flush dominates a save on ext4 (about 150 us
# against 5 us here). A record that outgrows its slot moves to a new file of twice the capacity, written
# aside and renamed over the old one, so that path stays atomic too.
#
# The payload is a JSON list of metadata, a newline, then the session's JSON object. The metadata carries
# the session id, so a file copied or swapped under another name is refused.
#
# The file's mtime is set to the session's expiry time. touch() then rewrites no data, only that time,
# and reap() finds expired candidates with one stat() per file without opening any. The expiry in
# the record is authoritative together with the mtime: a session expires at max(record, mtime), because a
# write sets the mtime to "now" for a moment before it is set to the new expiry.
#
# The lock of a session is flock() on its data file. Because writes happen in place the file keeps its
# inode; the one exception (a record moving to a bigger file) and deletion are detected by the waiter,
# which finds the inode it locked unlinked and retries on the current file.

_FILE_MAGIC = b"SSK1"
_FILE_HEADER = struct.Struct("<4sI8x")
_SLOT_HEADER = struct.Struct("<QII")
_MIN_SLOT = 1024
_STATE_FILE = ".reap-state"
_REAP_LOCK = ".reap-lock"
_META_ROOM = 1024          # bytes: a record's metadata line is under 300
_TORN_READ_TRIES = 3       # unlocked reads of a file whose slots both fail their CRC, before the lock


def _slot_limit():
    """The largest slot capacity a file store writes (and so the bound on what it ever reads).

    A slot holds a record of at most twice ``DEFAULTS["max_size"]`` bytes of data plus its metadata:
    Session bounds what one block makes of a session by its max_size, but concurrent merges of other
    keys may take it past that, and the headroom keeps such a session writable. Capacities are powers of
    two, so at the default max_size of 1 MiB a slot holds up to 4 MiB and a file is at most
    16 + 2 x 4 MiB. A bigger record is refused (SessionTooLarge) and a bigger file is not one this store
    wrote: it reads as no session, and no reader ever reads more than that bound (issue 9: a 2 GiB
    sparse file used to be read whole by load, count, ls and reap).
    """
    max_size = DEFAULTS["max_size"]
    if _slot_limit_cache[0] != max_size:      # computed again only when the setting changes
        _slot_limit_cache[:] = [max_size, max(
            _MIN_SLOT, 1 << (2 * max_size + _META_ROOM + _SLOT_HEADER.size - 1).bit_length())]
    return _slot_limit_cache[1]


_slot_limit_cache = [None, 0]


def _parse_session_file(blob):
    """Return ``(payload, slot index, seq, capacity)`` of the newest valid slot; payload None if none."""
    size = len(blob)
    if size < 32 or blob[:4] != _FILE_MAGIC:
        return None, -1, 0, 0
    cap = _FILE_HEADER.unpack_from(blob)[1]
    if cap < _MIN_SLOT or cap > _slot_limit():
        return None, -1, 0, 0
    slots = [(*_SLOT_HEADER.unpack_from(blob, 16), 0, 16)]
    if size >= cap + 32:
        slots.append((*_SLOT_HEADER.unpack_from(blob, cap + 16), 1, cap + 16))
        if slots[1][0] > slots[0][0]:
            slots.reverse()                        # newest first: usually the only CRC computed
    for seq, length, crc, index, offset in slots:
        start = offset + 16
        if length > cap - 16 or start + length > size:
            continue
        payload = blob[start:start + length]
        if zlib.crc32(payload, zlib.crc32(blob[offset:offset + 12])) == crc:
            return payload, index, seq, cap
    return None, -1, 0, cap


def _slot_bytes(seq, payload):
    head = struct.pack("<QI", seq, len(payload))
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def _encode_record(sid, record):
    meta = _encode_fast([1, sid, record.created, record.expires, record.timeout, record.max_age,
                         record.forward])
    return f"{meta}\n{record.data}".encode("utf-8")


def _decode_record(sid, payload, mtime):
    """Decode a slot payload into a Record, or None if it is not a record of ``sid``."""
    try:
        head, _, data = payload.partition(b"\n")
        version, owner, created, expires, timeout, max_age, forward = _decode_fast(head.decode("ascii"))
        if version != 1 or owner != sid:
            return None
        if forward is None:       # a tombstone's mtime never counts: it dies when its grace ends
            expires = max(expires, mtime)
        return Record(data.decode("utf-8"), created, expires, timeout, max_age, forward)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


def _read_fd(fd, st=None):
    """Return ``(contents, stat)`` of an open file: one fstat (unless ``st`` is given, a stat of the
    file made since it last changed) and, for a few KB, one pread.

    Anything but a regular file (a FIFO, a device, a directory planted in the store) and a file bigger
    than any this store writes (see _slot_limit) read as empty, without a read, so they parse as no
    session; no more than that bound is ever read.
    """
    if st is None:
        st = os.fstat(fd)
    limit = _FILE_HEADER.size + 2 * _slot_limit()
    if st.st_mode & 0o170000 != stat.S_IFREG or st.st_size > limit:      # S_ISREG, without a call
        return b"", st
    want = min(st.st_size + 4096, limit + 1)
    blob = os.pread(fd, want, 0)
    while len(blob) == want:                      # grew while we read: read the rest
        if len(blob) > limit:
            return b"", st
        chunk = os.pread(fd, 65536, len(blob))
        if not chunk:
            break
        blob += chunk
        want = len(blob)
    return blob, st


_UTIME_FD = os.utime in os.supports_fd


def _set_expiry(fd, expires, dir_fd, name):
    """Set a session file's mtime (its expiry) and atime to ``expires``: through its descriptor ``fd``,
    or where utime takes none, by ``name`` in the directory ``dir_fd`` (a symlink is not followed)."""
    ns = int(expires * 1e9)
    if _UTIME_FD:
        os.utime(fd, ns=(ns, ns))
    else:
        os.utime(name, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)


_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# Whatever sits in the store is opened without blocking and without becoming our terminal: a FIFO opened
# for reading would otherwise wait forever for a writer. Only a regular file is then read (fstat).
_O_SPECIAL_SAFE = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC | _O_SPECIAL_SAFE
_FILE_FLAGS = _O_NOFOLLOW | _O_CLOEXEC | _O_SPECIAL_SAFE
# open() errors that mean "no session file here": a symlink (ELOOP), a directory opened for writing
# (EISDIR), a socket or a FIFO without reader (ENXIO), a path through something that is not a directory.
_NOT_A_SESSION_FILE = (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR, errno.ENOENT)


def _open_dir(name, dir_fd=None, create=None):
    """Open the directory ``name`` (relative to ``dir_fd`` if given) without following a symlink.

    With ``create`` (a mode) a missing directory is made with exactly that mode, whatever the umask:
    the umask could otherwise leave it open to others (umask 000) or unusable to us (umask 277).
    Raises FileNotFoundError, NotADirectoryError (also for a symlink: O_NOFOLLOW with O_DIRECTORY) or
    another OSError.
    """
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create is None:
            raise
    try:
        os.mkdir(name, create, dir_fd=dir_fd)
    except FileExistsError:                       # made by another process meanwhile: theirs is as good
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, create)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_parents(path):
    """Create the missing directories above a store, each 0755 narrowed by the umask but always with
    the owner's rwx. The umask can only take bits away, so none is ever writable by group or others:
    whoever may write a parent may rename the store and put another directory in its place."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            continue
        fd = _open_dir(path)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o700 != 0o700:
                os.fchmod(fd, mode | 0o700)
        finally:
            os.close(fd)


def _open_store_dir(path, create):
    """Open the store directory ``path`` and return its descriptor; create it 0700 if missing and asked.

    Refuses (ContainerError) a symlink, a directory owned by another user or writable by group or others:
    on shared ground such as /tmp another local user could otherwise plant, read or swap session files.
    The checks are made on the open descriptor (fstat), so what was checked is what gets used.
    """
    try:
        try:
            fd = _open_dir(path)
        except FileNotFoundError:
            if not create:
                raise ContainerError(f"session store {path!r} does not exist") from None
            _make_parents(os.path.dirname(os.path.abspath(path)))
            fd = _open_dir(path, create=0o700)
    except NotADirectoryError:
        try:
            is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            is_link = False
        if is_link:
            raise ContainerError(f"session store {path!r} is a symbolic link; refusing it "
                                 f"(give the real path)") from None
        raise ContainerError(f"session store {path!r} is not a directory") from None
    except PermissionError:
        raise                                 # open_store names the user and the remedy
    except OSError as exc:
        raise ContainerError(f"cannot open session store {path!r}: {exc}") from exc
    try:
        _check_private(f"session store {path!r}", os.fstat(fd), "chmod 700")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_store_dir(path, create):
    """Make sure ``path`` is a directory only we control (see _open_store_dir); create it if asked."""
    os.close(_open_store_dir(path, create))


def _check_private(what, st, remedy):
    """Refuse (ContainerError) a file or directory, by its stat ``st``, that another user owns or may
    write to: a session store must be changeable by its owner only."""
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise ContainerError(f"{what} is owned by uid {st.st_uid}, not by this process "
                             f"(uid {os.geteuid()}); refusing what another user controls")
    if os.name != "nt" and st.st_mode & 0o022:
        raise ContainerError(f"{what} is writable by group or others (mode {st.st_mode & 0o777:o}); "
                             f"run '{remedy}' on it")


class _FileLock:
    """A held lock of one file: the open descriptor whose flock we hold. For a session file also the
    descriptor of its fan-out directory and its name there (the session id), to unlink or replace it
    relative to that, and ``held``: the set of session ids whose locks the acquiring thread holds, which
    lists it until release. ``stat`` is the file's fstat taken just after the lock was acquired."""

    __slots__ = ("fd", "path", "stat", "dir_fd", "name", "held")

    def __init__(self, fd, path, stat, dir_fd=None, name=None, held=None):
        self.fd, self.path, self.stat, self.dir_fd, self.name = fd, path, stat, dir_fd, name
        self.held = held
        if held is not None:
            held.add(name)

    def release(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            if self.held is not None:
                self.held.discard(self.name)
            try:
                _unlock(fd)
            finally:
                os.close(fd)
                if self.dir_fd is not None:
                    os.close(self.dir_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


class _Parked:
    """One thread's slot for the descriptors a load of session ``sid`` opened (its file, for reading
    and writing, and its fan-out directory), kept for the write-back that usually follows; see
    FileContainer._park. ``fds`` is None or the pair; ``pid`` is the process that last used the slot.
    Each pair is closed once: handed on by ``take``, replaced by ``put``, or by ``close`` (also when
    the thread ends)."""

    __slots__ = ("sid", "pid", "fds", "__weakref__")

    def __init__(self):
        self.sid = self.fds = None
        self.pid = os.getpid()

    def put(self, sid, fd, dir_fd):
        previous, self.fds, self.sid = self.fds, (fd, dir_fd), sid
        if previous is not None:
            os.close(previous[0])
            os.close(previous[1])

    def take(self, sid):
        """``(fd, dir_fd)`` if these are ``sid``'s and this process's (the caller owns them then);
        else close them and return None."""
        fds, self.fds = self.fds, None
        if fds is None:
            return None
        if self.pid != os.getpid():           # a forked child's copy of its parent's slot
            self.pid = os.getpid()
        elif sid == self.sid:
            return fds
        for fd in fds:
            os.close(fd)
        return None

    def close(self):
        fds, self.fds = self.fds, None
        if fds is not None:
            for fd in fds:
                try:
                    os.close(fd)
                except Exception:     # OSError, or the os module already torn down at interpreter exit
                    pass

    __del__ = close


class FileContainer(Container):
    """One file per session in a directory tree: the stdlib-only default. POSIX only.

    :param path: the store directory; created 0700 if missing (missing parents 0755, see
        ``_make_parents``), refused if it is a symlink, owned by another user or writable by others.
    :param durable: fsync every write (and the directory when a file is created or replaced), so that
        a power loss keeps the last acknowledged write. Off by default: a killed process loses nothing
        either way, only a machine crash can.

    Writes are atomic (see the layout above). Every directory and file is created private whatever the
    umask: fan-out directories 0700, session and bookkeeping files 0600.

    The container holds one descriptor, of the store directory, opened (and checked) at construction;
    every file is opened relative to it, and relative to its fan-out directory opened without following
    a symlink, and never through a symlink itself. Renaming the store or planting a symlink in its place
    or in place of a fan-out directory after that changes nothing: the container keeps using the
    directory it checked. That descriptor is only ever a ``dir_fd``, never read from, so it is safe to
    share between threads and across ``fork()``. Besides it, each thread may keep the two descriptors
    of the session it loaded last until its next call (see ``_park``). ``close()`` frees them all; the
    next use reopens the path and checks it again (call it when no other thread is using the
    container). Pickles as its path.
    Not for NFS or SMB: their flock() emulation is not reliable.
    """

    _dir_fd = None

    def __init__(self, path, durable=None, create=True):
        self.path = os.path.abspath(os.fspath(path))
        self.durable = DEFAULTS["durable"] if durable is None else bool(durable)
        self._fd_lock = _thread.allocate_lock()
        # per thread: .held, the ids of the sessions whose locks it holds; .parked, see _park
        self._thread_state = _thread._local()
        import weakref                            # not at import: a CGI script may never make a store
        self._all_parked = weakref.WeakSet()
        self._dir_fd = _open_store_dir(self.path, create)
        self._prefix = self.path + os.sep
        self.last_reap_visited = 0

    def __reduce__(self):
        return (FileContainer, (self.path, self.durable, False))

    def __repr__(self):
        return f"FileContainer({self.path!r})"

    def close(self):
        with self._fd_lock:
            fd, self._dir_fd = self._dir_fd, None
            slots = list(self._all_parked)
        for slot in slots:
            slot.close()
        if fd is not None:
            os.close(fd)

    def __del__(self):
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except Exception:     # OSError, or the os module already torn down at interpreter exit
                pass

    def _root(self):
        """The descriptor of the store directory, reopened and checked again after close()."""
        fd = self._dir_fd
        if fd is None:
            with self._fd_lock:
                if self._dir_fd is None:
                    self._dir_fd = _open_store_dir(self.path, False)
                fd = self._dir_fd
        return fd

    def _file(self, sid):
        """The path of ``sid``'s file, for messages (files are opened relative to the store's descriptor)."""
        # Session already checks ids; this guards direct callers (CLI, admin scripts) of the container.
        return f"{self._prefix}{_require_sid(sid)[:2]}{os.sep}{sid}"

    def _subdir(self, name, create=False):
        """Open the fan-out directory ``name`` (made 0700 if missing and ``create``); None if it is
        missing or not a directory of its own (a symlink is not followed)."""
        try:
            return _open_dir(name, self._root(), 0o700 if create else None)
        except (FileNotFoundError, NotADirectoryError):
            if create:
                raise
            return None

    # -- descriptors kept from a load for the write-back --------------------------------
    # A request loads its session, then writes it back or touches it: the same file, from the same
    # thread, moments later. So load() keeps the two descriptors it opened, the file's (opened for
    # reading and writing) and its fan-out directory's, in a one-entry slot of the calling thread, and
    # the thread's next lock of that session takes them instead of opening both again: two opens and
    # two closes fewer per request, which pays for the directory opens of the item-11 hardening. A
    # parked descriptor is no lock: the lock is still taken on it, and then checked as on any other
    # open (a record moved to a bigger file, or a deleted session, leaves it unlinked, and the current
    # file is opened instead). The thread's next load or lock of another session closes what is
    # parked, and so do the end of the thread and close(); a thread thus keeps at most two descriptors
    # per container between requests. Descriptors parked before a fork() are never used by the child:
    # they share their open file description, and with it any flock, with the parent's.

    def _park(self, sid, fd, dir_fd):
        slot = getattr(self._thread_state, "parked", None)
        if slot is None:
            slot = self._thread_state.parked = _Parked()
            self._all_parked.add(slot)
        slot.put(sid, fd, dir_fd)

    # -- reading -----------------------------------------------------------------

    def _open_file(self, sid, flags):
        """Open the session file of ``sid``; return ``(fd, fan-out directory fd)``, or None if there is
        none. Neither a symlinked file nor a symlinked fan-out directory counts, nor a socket or a
        directory in its place; a FIFO or a device opens without blocking and reads as empty."""
        root = self._dir_fd
        try:
            dir_fd = os.open(_require_sid(sid)[:2], _DIR_FLAGS, dir_fd=self._root() if root is None else root)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ContainerError(f"cannot open the directory of session file {self._file(sid)!r}: "
                                 f"{exc}") from exc
        try:
            return os.open(sid, flags | _FILE_FLAGS, dir_fd=dir_fd), dir_fd
        except OSError as exc:
            if exc.errno not in _NOT_A_SESSION_FILE:
                os.close(dir_fd)
                raise ContainerError(f"cannot open session file {self._file(sid)!r}: {exc}") from exc
        os.close(dir_fd)
        return None

    def load(self, sid):
        """Read ``sid``'s record without its lock; None if absent, damaged or not a record of ``sid``.

        A read that overlaps two write-backs can find both slots failing their CRC although the file is
        fine (issue 9: about once in 10^5 loads of a 300 KB session under write load). Such a read is
        retried; when every try fails, the file is read once more under the session's lock (waiting at
        most ``DEFAULTS["lock_timeout"]``, then LockTimeout), where no write runs, so a live session
        always loads with its old or its new content. When this thread holds that lock already
        (exclusive mode), nothing can be writing and the first read is final.
        """
        for _ in range(_TORN_READ_TRIES):
            writable = True
            try:
                opened = self._open_file(sid, os.O_RDWR)
            except ContainerError:    # not writable by us (a read-only mount, a file made read-only)
                writable = False
                opened = self._open_file(sid, os.O_RDONLY)
            if opened is None:
                return None
            fd, dir_fd = opened
            try:
                blob, st = _read_fd(fd)
            except BaseException:
                os.close(fd)
                os.close(dir_fd)
                raise
            payload, _, _, cap = _parse_session_file(blob)
            if payload is not None and writable:      # a regular file holding a record
                self._park(sid, fd, dir_fd)
            else:
                os.close(fd)
                os.close(dir_fd)
            if payload is not None or not cap or sid in self._held_here():
                break                 # a record, not a session file at all, or no writer can run
        else:
            handle = self._lock(sid, DEFAULTS["lock_timeout"], os.O_RDONLY)
            if handle is None:
                return None
            with handle:
                blob, st = _read_fd(handle.fd)
            payload = _parse_session_file(blob)[0]
        return None if payload is None else _decode_record(sid, payload, st.st_mtime)

    # -- locking -----------------------------------------------------------------

    def _held_here(self):
        """The set of the ids of the sessions whose locks this thread holds."""
        held = getattr(self._thread_state, "held", None)
        if held is None:
            held = self._thread_state.held = set()
        return held

    def lock(self, sid, timeout):
        return self._lock(sid, timeout, os.O_RDWR)

    def _lock(self, sid, timeout, flags):
        slot = getattr(self._thread_state, "parked", None)        # what this thread's load parked
        opened = None if slot is None or slot.fds is None else slot.take(sid)
        while True:
            if opened is None:
                opened = self._open_file(sid, flags)
            if opened is None:
                return None
            fd, dir_fd = opened
            try:
                _wait_lock(fd, timeout, f"session {_short(sid)}")
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                os.close(dir_fd)
                raise
            if st.st_nlink and stat.S_ISREG(st.st_mode):
                return _FileLock(fd, None, st, dir_fd, sid, self._held_here())
            _unlock(fd)
            os.close(fd)
            os.close(dir_fd)
            if st.st_nlink:
                return None                           # a FIFO or a device in its place: no session
            # The file was deleted or replaced while we waited: try the one that is there now.
            opened = None

    # -- writing -----------------------------------------------------------------

    def _create_file(self, dir_fd, name, payload, expires, cap=None):
        """Write a new session file ``name`` (must not exist) in ``dir_fd`` holding ``payload`` in slot 0;
        return its descriptor. Mode 0600 whatever the umask. Raises SessionTooLarge, writing nothing, for
        a payload bigger than a slot may be (_slot_limit)."""
        limit = _slot_limit()
        if len(payload) + _SLOT_HEADER.size > limit:
            raise SessionTooLarge(f"a session record of {len(payload)} bytes does not fit a file store "
                                  f"(at most {limit - _SLOT_HEADER.size}: twice DEFAULTS['max_size'] and "
                                  f"metadata); nothing was stored")
        cap = cap or max(_MIN_SLOT, 1 << (len(payload) + _SLOT_HEADER.size - 1).bit_length())
        blob = _FILE_HEADER.pack(_FILE_MAGIC, cap) + _slot_bytes(1, payload)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, blob, 0)
            _set_expiry(fd, expires, dir_fd, name)
            if self.durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(name, dir_fd)
            raise
        return fd

    def _sync_dir(self, dir_fd):
        if self.durable:
            os.fsync(dir_fd)

    def create(self, sid, record):
        path = self._file(sid)
        try:
            dir_fd = self._subdir(sid[:2], create=True)
            try:
                os.close(self._create_file(dir_fd, sid, _encode_record(sid, record), record.expires))
                self._sync_dir(dir_fd)
            finally:
                os.close(dir_fd)
        except FileExistsError:
            raise ContainerError(f"session {_short(sid)} exists already") from None
        except OSError as exc:
            raise ContainerError(f"cannot create session file {path!r}: {exc}") from exc

    def _read_locked(self, sid, handle, fresh=False):
        """The record in the locked file of ``handle`` and where it lies: ``(record or None, slot)``.
        ``fresh``: the handle was taken just now, so its stat still describes the file (no write can
        have come between: we hold the lock), and the read needs no fstat of its own."""
        blob, st = _read_fd(handle.fd, handle.stat if fresh else None)
        payload, index, seq, cap = _parse_session_file(blob)
        return (payload and _decode_record(sid, payload, st.st_mtime)), (index, seq, cap)

    def _write_locked(self, sid, handle, slot, record):
        """Write ``record`` into the locked file of ``handle``: over the older slot (one pwrite, then
        the mtime), or into a bigger file renamed over it. A crash at any point leaves the old record
        or the new one."""
        index, seq, cap = slot
        payload = _encode_record(sid, record)
        try:
            if len(payload) + _SLOT_HEADER.size <= cap:
                offset = _FILE_HEADER.size + (1 - index) * cap
                _write_all(handle.fd, _slot_bytes(seq + 1, payload), offset)
                _set_expiry(handle.fd, record.expires, handle.dir_fd, handle.name)
                if self.durable:
                    os.fsync(handle.fd)
            else:
                self._grow(handle, payload, record.expires)
        except OSError as exc:
            raise ContainerError(f"cannot write session file {self._file(sid)!r} (the stored session "
                                 f"is unchanged): {exc}") from exc

    def update(self, sid, changed, deleted, meta, now, held=None, base=None):
        handle = held or self.lock(sid, DEFAULTS["lock_timeout"])
        if handle is None:
            return False
        try:
            current, slot = self._read_locked(sid, handle, fresh=held is None)
            if not current or not current.writable(now):
                return False
            self._write_locked(sid, handle, slot, meta.replace(
                data=_merge_data(current.data, changed, deleted, base)))
            return True
        finally:
            if held is None:
                handle.release()

    def rotate(self, old, new, changed, deleted, meta, tombstone, now, held=None, base=None):
        """Under ``old``'s lock, which every write-back of ``old`` takes too: create ``new``'s file, then
        turn ``old``'s into the tombstone (or remove it). Killed in between, both files hold the session
        and the old id still works: nothing is lost, the rotation just did not happen."""
        handle = held or self.lock(old, DEFAULTS["lock_timeout"])
        if handle is None:
            return False
        try:
            current, slot = self._read_locked(old, handle, fresh=held is None)
            if not current or not current.writable(now):
                return False
            self.create(new, meta.replace(data=_merge_data(current.data, changed, deleted, base)))
            try:
                if tombstone is None:
                    os.unlink(handle.name, dir_fd=handle.dir_fd)
                    self._sync_dir(handle.dir_fd)
                else:
                    self._write_locked(old, handle, slot, tombstone)
            except BaseException:
                self._unlink_in(new[:2], new)         # the old record stays the session
                raise
            return True
        finally:
            if held is None:
                handle.release()

    def _grow(self, handle, payload, expires):
        """Move a record that outgrew its slots to a bigger file, renamed over the old one.

        The new file is locked before it becomes visible and the handle switches to it, so the session
        stays locked throughout; waiters on the old inode find it unlinked and retry on the new one.
        """
        tmp = f"{handle.name}.{os.getpid()}.tmp"
        _unlink_quietly(tmp, handle.dir_fd)
        fd = self._create_file(handle.dir_fd, tmp, payload, expires)
        try:
            _try_lock(fd)
            os.replace(tmp, handle.name, src_dir_fd=handle.dir_fd, dst_dir_fd=handle.dir_fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp, handle.dir_fd)
            raise
        self._sync_dir(handle.dir_fd)
        old = handle.fd
        handle.fd, handle.stat = fd, os.fstat(fd)
        _unlock(old)
        os.close(old)

    def touch(self, sid, expires, timeout=None, now=None, held=None):
        """Set the file's mtime to ``expires``: no data is rewritten. Under the session's lock (``held``,
        or taken without waiting: a busy session is being written, which moves its expiry anyway), the
        record is read first to leave expired sessions, tombstones and changed timeouts alone. Touches
        are throttled by Session, so this costs little."""
        if held is None:
            try:
                handle = self.lock(sid, 0)
            except LockTimeout:
                return False
            if handle is None:
                return False
        else:
            handle = held
        try:
            record = self._read_locked(sid, handle, fresh=held is None)[0]
            if (record and record.writable(now if now is not None else record.expires)
                    and record.expires < expires and (timeout is None or record.timeout == timeout)):
                _set_expiry(handle.fd, expires, handle.dir_fd, handle.name)
                return True
            return False
        except OSError as exc:
            raise ContainerError(f"cannot touch session {_short(sid)}: {exc}") from exc
        finally:
            if held is None:
                handle.release()

    def delete(self, sid, held=None):
        handle = held or self.lock(sid, DEFAULTS["lock_timeout"])
        if handle is None:
            return
        try:
            record = self._read_locked(sid, handle, fresh=held is None)[0]
            if record and record.forward is not None:
                # the lock order is the rotation's (old id, then new), so this cannot deadlock with it
                target = self.lock(record.forward, DEFAULTS["lock_timeout"])
                if target is not None:
                    with target:
                        _unlink_quietly(target.name, target.dir_fd)
                        self._sync_dir(target.dir_fd)
            _unlink_quietly(handle.name, handle.dir_fd)
            self._sync_dir(handle.dir_fd)
        finally:
            if held is None:
                handle.release()

    # -- scanning ----------------------------------------------------------------

    def _root_names(self):
        """The names in the store directory."""
        # A descriptor of our own: listing through the shared one would share its read position.
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._root())
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def _subdirs(self, after="", names=None):
        """The fan-out sub-directories in sorted order, those after ``after`` only."""
        names = self._root_names() if names is None else names
        return sorted(n for n in names if len(n) == 2 and not n.strip(_SID_ALPHABET) and n > after)

    def _entries(self, subdir):
        """``(name, lstat)`` of each entry of the fan-out directory ``subdir`` (none if it is missing or
        not a directory of its own)."""
        dir_fd = self._subdir(subdir)
        if dir_fd is None:
            return []
        entries = []
        try:
            with os.scandir(dir_fd) as it:
                for entry in it:
                    try:
                        entries.append((entry.name, entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        pass
        finally:
            os.close(dir_fd)
        return entries

    def sids(self, now=None):
        now = time.time() if now is None else now
        for subdir in self._subdirs():
            for name, st in self._entries(subdir):
                if not is_valid_session_id(name) or not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_mtime >= now:
                    yield name
                    continue
                record = self.load(name)          # mtime says expired; the record may say otherwise
                if record is not None and record.expires >= now:
                    yield name

    def reap(self, now=None, budget=None, interval=0.0, margin=None):
        """Remove sessions that expired more than ``margin`` seconds before ``now`` (default
        ``DEFAULTS["reap_margin"]``, 300), and temporary files left by killed writers.

        The margin is the clock skew the store tolerates: a reaper whose clock runs up to that much
        ahead of the others' removes no session they still see live (issue 9: one request from a
        process 1 h fast reaped every session). An expired session loads as absent meanwhile.

        One reaper per store at a time: the others return 0 at once (a non-blocking flock on
        ``.reap-lock``, which the kernel releases if the reaper dies). Each candidate is found by the mtime
        of its file alone, then locked without waiting (a session in use is skipped) and re-read, and
        removed only if its record is expired. With ``budget`` seconds the walk stops in time and the next
        call resumes where it stopped (the cursor is kept in ``.reap-state``).

        Housekeeping never gets in the way: an entry that cannot be read or removed is skipped, a
        damaged ``.reap-state`` counts as none, and a state that cannot be saved (a full disk) is only
        not saved, without a temporary file left behind. A store where even the reaper's lock cannot be
        opened (read-only, not ours) raises ContainerError, which ``open_session`` ignores.
        """
        now = time.time() if now is None else now
        flags = os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | _O_SPECIAL_SAFE
        try:
            root = self._root()
            fd = os.open(_REAP_LOCK, flags, 0o600, dir_fd=root)
        except OSError as exc:
            raise ContainerError(f"cannot reap {self.path!r}: its reaper lock does not open ({exc})") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ContainerError(f"cannot reap {self.path!r}: {_REAP_LOCK} is not a regular file; "
                                     f"remove it")
            if stat.S_IMODE(st.st_mode) != 0o600:                # made under a umask such as 277
                os.fchmod(fd, 0o600)
            if not _try_lock(fd):
                return 0
            last, cursor = self._read_reap_state(root, now)
            if interval and now - last < interval:
                return 0
            names = self._root_names()
            for name in names:            # only the reaper writes these, and we are the reaper now
                if name.startswith(_STATE_FILE + ".") and name.endswith(".tmp"):
                    try:
                        _unlink_quietly(name, root)
                    except OSError:
                        pass                          # a directory, say: not worth failing for
            cutoff = now - (DEFAULTS["reap_margin"] if margin is None else margin)
            removed, visited, finished = self._reap_walk(now, cutoff, cursor, budget, names)
            self.last_reap_visited = visited
            self._write_reap_state(root, now, finished)
            return removed
        except ContainerError:
            raise
        except OSError as exc:
            raise ContainerError(f"cannot reap {self.path!r}: {exc}") from exc
        finally:
            _unlock(fd)
            os.close(fd)

    @staticmethod
    def _read_reap_state(root, now):
        """``(time of the last reap, cursor)`` from ``.reap-state``; ``(-inf, "")`` when there is none
        or it is damaged: not a small regular file, not ``[finite number, "" or a fan-out name]``, or
        a time in the future (a skewed clock; trusting it would stop reaping until then)."""
        try:
            fd = os.open(_STATE_FILE, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_SPECIAL_SAFE,
                         dir_fd=root)
            try:
                st = os.fstat(fd)
                text = os.read(fd, 4096) if stat.S_ISREG(st.st_mode) and st.st_size < 4096 else b""
            finally:
                os.close(fd)
            last, cursor = _decode(text.decode("ascii"))
            if (type(last) in (int, float) and last - last == 0 and last <= now and type(cursor) is str
                    and len(cursor) in (0, 2) and not cursor.strip(_SID_ALPHABET)):
                return last, cursor
        except (OSError, ValueError, TypeError):
            pass
        return float("-inf"), ""

    @staticmethod
    def _write_reap_state(root, now, finished):
        """Save ``.reap-state`` (0600, replaced atomically), or nothing when the store refuses it.

        The state only spares work: its time keeps other processes from reaping again within their
        interval and its cursor lets the next reap resume. So a full disk or a read-only store makes
        it stale, never the reap fail, and the temporary file goes too (issue 9: it used to stay).
        """
        tmp = f"{_STATE_FILE}.{os.getpid()}.tmp"
        text = _encode([now, "" if finished is None else finished]).encode("ascii")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_CLOEXEC
                         | _O_SPECIAL_SAFE, 0o600, dir_fd=root)
            try:
                os.fchmod(fd, 0o600)
                _write_all(fd, text, 0)
            finally:
                os.close(fd)
            os.replace(tmp, _STATE_FILE, src_dir_fd=root, dst_dir_fd=root)
        except OSError:
            try:
                _unlink_quietly(tmp, root)
            except OSError:
                pass

    def _reap_walk(self, now, cutoff, cursor, budget, names=None):
        """Walk the sub-directories after ``cursor``, removing sessions that expired before ``cutoff``;
        return (removed, visited, cursor to resume or None).

        At least one sub-directory is walked per call, so a tiny budget still makes progress."""
        deadline = None if budget is None else time.monotonic() + budget
        removed = visited = 0
        stale_tmp = now - 3600
        for subdir in self._subdirs(cursor, names):
            if visited and deadline is not None and time.monotonic() > deadline:
                return removed, visited, cursor       # resume after the last finished sub-directory
            cursor = subdir
            try:
                entries = self._entries(subdir)
            except OSError:
                continue                              # unreadable: the others still get reaped
            for name, st in entries:
                visited += 1
                if st.st_mtime >= cutoff or not stat.S_ISREG(st.st_mode):
                    continue                          # live, or not ours (a FIFO, a directory...)
                try:
                    if is_valid_session_id(name):
                        removed += self._reap_one(name, cutoff)
                    elif name.endswith(".tmp") and st.st_mtime < stale_tmp:
                        self._unlink_in(subdir, name)
                except OSError:                       # ContainerError included
                    continue      # one entry we cannot read or remove must not stop the others'
        return removed, visited, None

    def _unlink_in(self, subdir, name):
        dir_fd = self._subdir(subdir)
        if dir_fd is not None:
            try:
                _unlink_quietly(name, dir_fd)
            finally:
                os.close(dir_fd)

    def _reap_one(self, sid, cutoff):
        try:
            handle = self.lock(sid, 0)
        except LockTimeout:
            return 0                                  # in use right now: not abandoned
        if handle is None:
            return 0
        with handle:
            blob, st = _read_fd(handle.fd)
            payload = _parse_session_file(blob)[0]
            record = payload and _decode_record(sid, payload, st.st_mtime)
            if record and record.expires >= cutoff:
                _set_expiry(handle.fd, record.expires, handle.dir_fd, handle.name)
                return 0                              # a write was caught between data and mtime
            _unlink_quietly(handle.name, handle.dir_fd)
            return 1


def _write_all(fd, data, offset):
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _unlink_quietly(name, dir_fd=None):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


# Database containers: shared pieces ----------------------------------------------------
# SQLite and LMDB serialise their writers themselves, but their write lock covers the whole database, so
# it cannot be a session's own lock: exclusive mode holds that lock while user code runs, and every other
# session must keep writing meanwhile. A session is therefore locked with flock() on one of
# _LOCK_STRIPES lock files in a directory beside the database, picked by a stable hash of its id
# (zlib.crc32: Python's hash() differs between processes). The lock-file rules are FileContainer's: the
# files are never unlinked, and each acquisition opens its own descriptor, so threads exclude each other
# and the kernel drops the lock of a killed process.
#
# Stripes are taken by exclusive mode (for the whole block), by delete() and, without waiting, by the
# reaper; a merge write-back needs none, because it is one database transaction, atomic by itself. Two
# sessions wait on each other only when they share a stripe (1 in 4,096) and one of them is locked in
# exclusive mode or being deleted; the reaper skips a locked stripe instead of waiting. Locks are not
# reentrant, and that includes stripes: a thread holding the lock of one session that asks for the lock of
# another session on the same stripe waits for itself until LockTimeout. The write lock of the database is
# always taken after a stripe and never the other way round, so the two cannot deadlock.

_LOCK_STRIPES = 4096
_REAP_BATCH = 256          # expired sessions handled per reaper transaction (and lock files open at once)


class _StripeLocks:
    """Per-session locks of a database container: flock() on a striped lock file in ``directory``."""

    def __init__(self, directory, create=True):
        self.directory = directory
        _check_store_dir(directory, create)

    @staticmethod
    def _stripe(sid):
        return f"{zlib.crc32(sid.encode('ascii')) % _LOCK_STRIPES:03x}.lock"

    def _open(self, name):
        path = os.path.join(self.directory, name)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600), path
        except OSError as exc:
            raise ContainerError(f"cannot open lock file {path!r}: {exc}") from exc

    def acquire(self, sid, timeout):
        """Return the held lock of ``sid`` (release() it); raise LockTimeout after ``timeout`` seconds."""
        fd, path = self._open(self._stripe(sid))
        try:
            _wait_lock(fd, timeout, f"session {_short(sid)}")
        except BaseException:
            os.close(fd)
            raise
        return _FileLock(fd, path, None)

    def lock_stored(self, sid, timeout, is_stored):
        """The ``Container.lock`` contract: a held lock of ``sid``, or None if it is not stored."""
        if not is_stored(sid):
            return None
        handle = self.acquire(sid, timeout)
        if not is_stored(sid):              # deleted while we waited
            handle.release()
            return None
        return handle

    def try_many(self, sids):
        """Lock the stripes of ``sids`` without waiting: return (held locks, sids whose stripe is held)."""
        held, lockable, busy = {}, [], set()
        for sid in sids:
            name = self._stripe(sid)
            if name in busy:
                continue
            if name not in held:
                fd, path = self._open(name)
                if not _try_lock(fd):
                    os.close(fd)
                    busy.add(name)
                    continue
                held[name] = _FileLock(fd, path, None)
            lockable.append(sid)
        return list(held.values()), lockable

    def try_reaper(self):
        """The store's reaper lock if no other reaper holds it, else None."""
        fd, path = self._open("reap.lock")
        if _try_lock(fd):
            return _FileLock(fd, path, None)
        os.close(fd)
        return None


class _TxnGate:
    """Calls into a database library run freely, except while something needs them all finished: LMDB
    allows ``set_mapsize`` only when the process has no transaction open, and ``fork()`` must not
    happen while another thread is inside SQLite or LMDB (see "fork()" below). ``block()`` waits for
    the calls in flight to end and holds new ones back until ``unblock()``."""

    __slots__ = ("_mutex", "_active", "_blocked")

    def __init__(self):
        self._mutex = _thread.allocate_lock()
        self._active = 0
        self._blocked = False

    def enter(self):
        while True:
            with self._mutex:
                if not self._blocked:
                    self._active += 1
                    return
            time.sleep(0.0005)

    def leave(self):
        with self._mutex:
            self._active -= 1

    def block(self, timeout=None):
        """Hold new calls back and wait until none is in flight (the caller must be in none). Returns
        False, unblocked again, if that took longer than ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._mutex:
                if not self._blocked:
                    self._blocked = True
                    break
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        while True:
            with self._mutex:
                if not self._active:
                    return True
            if deadline is not None and time.monotonic() > deadline:
                self.unblock()
                return False
            time.sleep(0.0002)

    def unblock(self):
        with self._mutex:
            self._blocked = False

    def alone(self, action):
        """Run ``action()`` while no call of this gate is in flight (the caller is in none)."""
        self.block()
        try:
            action()
        finally:
            self.unblock()


def _release_all(handles):
    for handle in handles:
        handle.release()


class _DatabaseContainer(Container):
    """What the SQLite and LMDB containers share: stripe locks (``self._stripes``) and the reaper, which
    walks the database's expiry index one batch at a time. A subclass provides ``_is_stored(sid)`` and
    the reaper's hooks:

    * ``_last_reap()``: when the previous reap started (None if never); ``_mark_reap(now)`` records this
      one. With ``interval``, a reap that started less than that long ago makes ``reap`` do nothing.
    * ``_expired(cutoff, cursor)``: ``(sids, cursor, removed)``: the next ``_REAP_BATCH`` entries of
      the index that expired before ``cutoff``, past ``cursor`` (None: from the start), as the session
      ids to remove and the cursor after them (None when there are no more); entries that name no
      valid session id (damaged) are removed at once, and ``removed`` counts those.
    * ``_remove(sids, cutoff)``: delete those still expired before ``cutoff``, in one transaction;
      return how many were deleted.
    * ``_reaped(removed)``: housekeeping after a reap (LMDB clears stale reader slots, SQLite checkpoints).
    """

    #: Candidates the last ``reap()`` read from the expiry index (the cost of the reap).
    last_reap_visited = 0

    def lock(self, sid, timeout):
        return self._stripes.lock_stored(sid, timeout, self._is_stored)

    def reap(self, now=None, budget=None, interval=0.0):
        """Remove expired sessions, walking the expiry index: O(expired), not O(all sessions).

        Only sessions that expired more than ``DEFAULTS["reap_margin"]`` seconds before ``now`` go: a
        reaper whose clock runs ahead by less than that removes no live session. One reaper at a time
        per store (a non-blocking flock on the stripe directory's ``reap.lock``; the others return 0),
        the time of the last reap is kept in the database for ``interval``. Candidates come in batches
        of ``_REAP_BATCH``; a session whose stripe is locked (in use) is skipped, the others are deleted
        in one transaction per batch, each re-checked inside it. With ``budget`` seconds the call stops
        after the batch that crossed it; the next call starts again at the earliest expiry, which is
        where the work left is.
        """
        now = time.time() if now is None else now
        cutoff = now - DEFAULTS["reap_margin"]
        self.last_reap_visited = 0
        reaper = self._stripes.try_reaper()
        if reaper is None:
            return 0
        removed = 0
        try:
            if interval:
                last = self._last_reap()
                if last is not None and now - last < interval:
                    return 0
            self._mark_reap(now)
            deadline = None if budget is None else time.monotonic() + budget
            cursor = None
            while True:
                sids, cursor, damaged = self._expired(cutoff, cursor)
                if cursor is None:
                    break
                removed += damaged
                self.last_reap_visited += len(sids)
                locks, lockable = self._stripes.try_many(sids)
                try:
                    if lockable:
                        removed += self._remove(lockable, cutoff)
                finally:
                    _release_all(locks)
                if deadline is not None and time.monotonic() > deadline:
                    break
        finally:
            reaper.release()
        self._reaped(removed)
        return removed

    def _reaped(self, removed):
        pass


def _require(module, extra):
    """Import an optional dependency, or raise ImportError saying how to install it."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"this sesskit container needs the '{module}' package: "
                          f"pip install 'sesskit[{extra}]' (or: pip install {module})") from exc


# fork() ----------------------------------------------------------------------------------
# A forked child has one thread but a copy of everything the parent's other threads held at that
# instant. An SQLite global mutex (its allocator's, its VFS's) taken by another thread stays locked in the
# child forever, and the child's first connect() hangs on it; py-lmdb's close() of an environment whose
# write transaction was open in another thread waits, in the child, for that thread to end it. And SQLite
# keeps the POSIX lock state of every open database file per process: a child that inherits the parent's
# state and opens a connection of its own believes it holds locks only the parent holds, so when the
# parent closed its last connection SQLite took itself for the last user, checkpointed and deleted the WAL,
# and the child went on writing into the deleted file: its writes were lost. (SQLite: "do not open an
# SQLite database connection, then fork()"; all three reproduced by TestDatabaseHardening.)
#
# So the first database container of a process registers fork handlers (os.register_at_fork). Before a
# fork they hold back new SQLite calls and LMDB transactions of every thread, wait until none is in
# flight (_TxnGate.block), and close this process's SQLite connections: the child inherits no SQLite
# handle and no lock state at all, and each thread of the parent reopens its connection on its next call.
# LMDB environments stay open in the parent; a child finds its copy idle (no transaction, no reader slot:
# max_spare_txns=0) and closes it before opening its own, which releases nothing of the parent's (py-lmdb
# refuses to open a path that is open in the process, the inherited copy included). The wait ends when
# the calls in flight do, which is bounded by SQLite's busy timeout; if it takes longer than that (a fork
# from inside a database call, by a signal handler), the fork goes ahead and the child refuses to use the
# store with ContainerError rather than hang. Connections opened by other code are not ours to manage.

_fork_lock = _thread.allocate_lock()     # held across a fork; guards the registration below
_fork_watched = False
_sqlite_containers = None                # weakref.WeakSet of this process's SQLite containers
_sqlite_gate = None                      # every SQLite call of this process runs inside it (a _TxnGate)
_sqlite_unsafe = False                   # in a child: the parent's SQLite calls had not ended at fork
_fork_blocked = ([], False)              # what the running fork's "before" handler blocked


def _watch_fork(sqlite_container=None):
    """Register the fork handlers once per process, and an SQLite container to be handled by them."""
    global _fork_watched, _sqlite_containers, _sqlite_gate
    with _fork_lock:
        if sqlite_container is not None:
            if _sqlite_containers is None:
                import weakref
                _sqlite_containers = weakref.WeakSet()
                _sqlite_gate = _TxnGate()
            _sqlite_containers.add(sqlite_container)
        if not _fork_watched and hasattr(os, "register_at_fork"):
            _fork_watched = True
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                                after_in_child=_after_fork_in_child)


def _before_fork():
    global _fork_blocked
    _fork_lock.acquire()
    _lmdb_envs_lock.acquire()
    wait = DEFAULTS["sqlite_busy_timeout"] + 1.0
    envs = [shared for shared in _lmdb_envs.values() if shared.gate.block(wait)]
    for shared in _lmdb_envs.values():
        shared.busy_at_fork = shared not in envs
    sqlite = _sqlite_gate is not None and _sqlite_gate.block(wait)
    if sqlite:
        for container in list(_sqlite_containers):
            container._close_connections(gated=False)
    _fork_blocked = (envs, sqlite)


def _after_fork_in_parent():
    envs, sqlite = _fork_blocked
    for shared in envs:
        shared.gate.unblock()
    if sqlite:
        _sqlite_gate.unblock()
    _lmdb_envs_lock.release()
    _fork_lock.release()


def _after_fork_in_child():
    global _sqlite_gate, _sqlite_unsafe
    if _sqlite_gate is not None:
        _sqlite_unsafe = _sqlite_unsafe or not _fork_blocked[1]
        _sqlite_gate = _TxnGate()          # the old one may have been locked by a thread the child lacks
    for shared in _lmdb_envs.values():
        # the inherited copies' gates are blocked by this fork (or count transactions of threads the
        # child lacks): fresh ones, or every later fork of the child would wait for them in vain
        shared.gate = _TxnGate()
    _lmdb_envs_lock.release()
    _fork_lock.release()


# SQLite --------------------------------------------------------------------------------
# Layout: PATH is the database file (WAL mode, so PATH-wal and PATH-shm sit beside it) and PATH.locks/ the
# directory of stripe and reaper lock files. One row per session in ``sessions``: its metadata (expiry
# indexed) and ``data``, the JSON text of its dict. Chosen by measurement (issue 8) over one row per key:
# a request then costs one SELECT to load and, when nobody wrote the session since, one conditional
# UPDATE to write back (see SQLiteContainer.update), against a join on load and an UPDATE plus upserts in
# an explicit transaction per write-back.
#
# Databases made by sesskit before that kept one row per key in a ``session_keys`` table; opening one
# migrates it in one transaction (see _SQLITE_MIGRATE). Stop every process of the old version first: one
# still running fails with "no such table: session_keys" (a ContainerError) once the migration is done.

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
    timeout REAL NOT NULL, max_age REAL NOT NULL, forward TEXT, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID;
"""
# From one row per key (sessions without data, session_keys) to one row per session, in one transaction:
# SQLite joins each session's rows into the text of its JSON object in key insertion order (rowid), so the
# text is copied as it is stored (a damaged row stays damaged, and loads as absent).
_SQLITE_MIGRATE = """
CREATE TABLE sessions_v2 (
    sid TEXT PRIMARY KEY NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
    timeout REAL NOT NULL, max_age REAL NOT NULL, forward TEXT, data TEXT NOT NULL);
INSERT INTO sessions_v2 SELECT sid, created, expires, timeout, max_age, forward,
    '{' || coalesce((SELECT group_concat(key || ':' || value, ',') FROM (SELECT key, value FROM session_keys
    WHERE sid = s.sid ORDER BY rowid)), '') || '}' FROM sessions s;
DROP TABLE session_keys;
DROP TABLE sessions;
ALTER TABLE sessions_v2 RENAME TO sessions;
CREATE INDEX sessions_by_expiry ON sessions (expires);
"""
_SQL_LOAD = "SELECT created, expires, timeout, max_age, forward, data FROM sessions WHERE sid = ?"
_SQL_EXISTS = "SELECT 1 FROM sessions WHERE sid = ?"
_SQL_INSERT = "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)"
_SQL_CURRENT = "SELECT expires, forward, data FROM sessions WHERE sid = ?"
# A write-back as one statement: it lands only if the stored text is still the one the caller loaded (and
# the session is writable), and then its result is simply the caller's dict.
_SQL_SWAP = ("UPDATE sessions SET created = ?, expires = ?, timeout = ?, max_age = ?, forward = ?, data = ? "
             "WHERE sid = ? AND data = ? AND forward IS NULL AND expires >= ?")
_SQL_REWRITE = ("UPDATE sessions SET created = ?, expires = ?, timeout = ?, max_age = ?, forward = ?, data = ? "
                "WHERE sid = ?")
_SQL_DELETE_SESSION = "DELETE FROM sessions WHERE sid = ?"
_SQL_TOUCH = ("UPDATE sessions SET expires = ? WHERE sid = ? AND expires < ? AND forward IS NULL "
              "AND (? IS NULL OR timeout = ?) AND (? IS NULL OR expires >= ?)")
# Ids come out as bytes and go back in as CAST(? AS TEXT), so that a damaged one (not UTF-8) can be
# listed past and removed; a row whose expires is not a number (damaged) is never live.
_SQL_EXPIRED = ("SELECT expires, CAST(sid AS BLOB) FROM sessions WHERE expires < ? "
                "AND (expires, sid) > (?, CAST(? AS TEXT)) ORDER BY expires, sid LIMIT ?")
_SQL_REAP_ONE = "DELETE FROM sessions WHERE sid = CAST(? AS TEXT) AND expires < ?"
_SQL_LIVE = "FROM sessions WHERE expires >= ? AND typeof(expires) IN ('real', 'integer')"
_SQLITE_RETRIES = 20       # extra attempts after "database is locked" outlasted the busy timeout
# A reader that keeps one snapshot for long (a backup, an sqlite3 shell) stops checkpoints from getting past
# it, so the WAL grows meanwhile (101 MiB for a 0.3 MiB database, issue 9), and SQLite never shrinks the
# file by itself. journal_size_limit trims it back to this size whenever it restarts from its beginning,
# and each reap() ends with a checkpoint that truncates it to nothing when no reader is using it.
_SQLITE_WAL_LIMIT = 4 << 20

#: Connections a forked child inherited anyway (a fork that bypassed os.register_at_fork, or came while
#: they were in use). They belong to the parent: closing them in the child (which the garbage collector
#: would do) runs SQLite's close-time file and lock handling, so they are parked here.
_inherited_connections = []


class _ThreadConnection:
    """One thread's SQLite connection. It lives in the thread's local storage, so it is closed when the
    thread ends (whatever started the thread), or by its container's close()."""

    __slots__ = ("con", "generation", "pid", "__weakref__")

    def __init__(self, con, generation):
        self.con, self.generation, self.pid = con, generation, os.getpid()

    def close(self, gated=True):
        """Close the connection; ``gated=False`` when the caller is inside the SQLite gate already."""
        con, self.con = self.con, None
        if con is None:
            return
        if self.pid != os.getpid():
            # a forked child dropping its parent's thread states: the connection is not ours to close
            _inherited_connections.append(con)
        elif gated:
            gate = _sqlite_gate
            gate.enter()
            try:
                con.close()
            finally:
                gate.leave()
        else:
            con.close()

    def __del__(self):
        self.close()


def _sqlite_busy(exc):
    return "locked" in str(exc) or "busy" in str(exc)


class SQLiteContainer(_DatabaseContainer):
    """Sessions in one SQLite database: many processes and threads, millions of sessions, stdlib only.

    :param path: the database file; created 0600 (its directory 0700) if missing. Beside it live the
        WAL files and ``PATH.locks/``, the directory of lock files.
    :param durable: ``synchronous=FULL``: every commit is fsynced, so a power loss keeps every
        acknowledged write. Off by default (``synchronous=NORMAL`` in WAL mode): a killed process loses
        nothing and the database is never corrupted, but a power loss or OS crash may undo the last
        commits. That is the trade FileContainer makes too.

    Guarantees:

    * Atomicity: every write (create, the merge of one write-back, touch, delete, one reaper batch) is
      one transaction (``BEGIN IMMEDIATE``, or a single statement); a session is one row, so a reader
      sees it wholly before or after a write.
    * Locking: a session's lock (exclusive mode, ``delete``, the reaper) is a stripe lock file (see
      "Database containers" above), not SQLite's write lock, so an exclusive block never stops other
      sessions; SQLite's lock is held only for each write. A merge write-back is a single transaction:
      an UPDATE conditional on the row still holding the text the block loaded (then the merge is the
      block's own dict) or, when another write landed since, one that re-reads the row, re-checks it
      and merges only the keys this block changed or deleted. SQLite's lock makes it atomic, so it takes
      no session lock and may land while an exclusive block of the same session runs. Nothing is lost
      either way: each write-back applies only its own keys.
    * Crashes: a process killed at any instant leaves the last committed state; its locks die with it.
    * Processes and threads: one connection per thread and per process, WAL so readers never wait for
      writers, a busy timeout plus a bounded retry on "database is locked". ``fork()`` waits for the
      SQLite calls of other threads in flight, and the parent closes its connections first, so the
      child inherits no handle (see "fork()" above); every thread reopens its connection on demand.
    * Expiry is indexed: ``reap()`` costs O(expired sessions), never a scan of all of them.

    Not for NFS or SMB (SQLite's and flock()'s locking are unreliable there).
    """

    def __init__(self, path, durable=None, create=True):
        import threading
        import weakref
        self._sqlite3 = __import__("sqlite3")
        self._threading = threading
        self.path = os.path.abspath(os.fspath(path))
        self.durable = DEFAULTS["durable"] if durable is None else bool(durable)
        self._create_file(create)
        self._stripes = _StripeLocks(self.path + ".locks", create)
        self._pid = os.getpid()
        self._local = threading.local()            # .holder: this thread's _ThreadConnection
        self._holders = weakref.WeakSet()          # every thread's, for close() and fork
        self._generation = 0                       # bumped by close(): older connections are stale
        self._mutex = threading.Lock()
        self.last_reap_visited = 0
        _watch_fork(self)
        self._retry(self._init_schema)

    def __reduce__(self):
        return (SQLiteContainer, (self.path, self.durable, False))

    def __repr__(self):
        return f"SQLiteContainer({self.path!r})"

    # -- connections -------------------------------------------------------------

    def _create_file(self, create):
        """Create the database file 0600 if asked, and refuse one another user could read or swap.

        Its directory must be one only we control (FileContainer's rule: SQLite creates the WAL files
        there) and the file a regular file of ours that nobody else may read or write; the WAL files
        inherit its mode."""
        _check_store_dir(os.path.dirname(self.path), create)
        flags = os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ContainerError(f"session store {self.path!r} is a symbolic link; refusing it "
                                     f"(give the real path)") from exc
            raise ContainerError(f"cannot open session database {self.path!r}: {exc}") from exc
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ContainerError(f"session database {self.path!r} is not a regular file")
        _check_private(f"session database {self.path!r}", st, "chmod 600")
        if os.name != "nt" and st.st_mode & 0o044:    # SQLite gives the WAL files the same mode
            raise ContainerError(f"session database {self.path!r} is readable by group or others (mode "
                                 f"{st.st_mode & 0o777:o}): its sessions could be stolen; run 'chmod 600' "
                                 f"on it")

    def _init_schema(self):
        con = self._conn()
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
        con.executescript(_SQLITE_SCHEMA)
        if self._old_layout(con):
            self._transaction(self._migrate)

    @staticmethod
    def _old_layout(con):
        return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'session_keys'"
                           ).fetchone() is not None

    def _migrate(self, con):
        """Turn a database of one row per key into one of one row per session (see _SQLITE_MIGRATE),
        unless another process did it while we waited for the write lock."""
        if self._old_layout(con):
            for statement in _SQLITE_MIGRATE.split(";"):
                if statement.strip():
                    con.execute(statement)

    def _conn(self):
        """This thread's connection, opened on first use in this thread and process."""
        holder = getattr(self._local, "holder", None)
        if (holder is not None and holder.con is not None and holder.generation == self._generation
                and self._pid == os.getpid()):
            return holder.con
        return self._connect()

    def _connect(self):
        if _sqlite_unsafe:
            raise ContainerError(f"session database {self.path!r}: this process was forked while another "
                                 f"thread was inside SQLite, so SQLite is unusable here; open the store "
                                 f"after fork(), or fork outside database calls")
        if self._pid != os.getpid():
            # Forked: the parent's connections and thread state are not ours to use (SQLite: "do not
            # carry an open database connection across a fork()"), nor to close.
            for holder in list(self._holders):
                if holder.con is not None:
                    _inherited_connections.append(holder.con)
                    holder.con = None
            self._holders = type(self._holders)()
            self._local = self._threading.local()
            self._mutex = self._threading.Lock()
            self._pid = os.getpid()
        try:
            con = self._sqlite3.connect(self.path, timeout=DEFAULTS["sqlite_busy_timeout"],
                                        isolation_level=None, check_same_thread=False,
                                        cached_statements=64)
            con.execute("PRAGMA synchronous=" + ("FULL" if self.durable else "NORMAL"))
            con.execute(f"PRAGMA cache_size=-{DEFAULTS['sqlite_cache_kib']}")
            con.execute(f"PRAGMA journal_size_limit={_SQLITE_WAL_LIMIT}")
        except self._sqlite3.Error as exc:
            raise ContainerError(f"cannot open session database {self.path!r}: {exc}") from exc
        old = getattr(self._local, "holder", None)
        if old is not None:
            old.close(gated=False)                     # we are inside the gate (_retry)
        holder = _ThreadConnection(con, self._generation)
        with self._mutex:
            self._holders.add(holder)
        self._local.holder = holder       # goes, and closes its connection, when the thread ends
        return con

    def close(self):
        """Close this process's connections, those of other threads included: call it when the store
        is no longer used. The container reopens connections on demand."""
        self._close_connections()

    def _close_connections(self, gated=True):
        if self._pid != os.getpid():
            return
        with self._mutex:
            self._generation += 1
            holders = list(self._holders)
        for holder in holders:
            holder.close(gated)

    def _retry(self, work, *args):
        """Run ``work`` again while SQLite says "database is locked" past its busy timeout (bounded).
        Each attempt runs inside the SQLite gate, so that no fork() happens in the middle of it."""
        sqlite3 = self._sqlite3
        for attempt in range(_SQLITE_RETRIES + 1):
            gate = _sqlite_gate
            gate.enter()
            try:
                return work(*args)
            except sqlite3.OperationalError as exc:
                if not _sqlite_busy(exc) or attempt == _SQLITE_RETRIES:
                    raise ContainerError(f"session database {self.path!r}: {exc}") from exc
            except sqlite3.Error as exc:
                raise ContainerError(f"session database {self.path!r}: {exc}") from exc
            finally:
                gate.leave()
            time.sleep(DEFAULTS["poll_interval"])

    def _transaction(self, work, *args):
        """Run ``work(con, *args)`` in one write transaction; roll back on any exception."""
        def attempt():
            con = self._conn()
            con.execute("BEGIN IMMEDIATE")
            try:
                result = work(con, *args)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            return result
        return self._retry(attempt)

    def _query(self, sql, params, damaged=_MISSING):
        """The rows of one statement; ``damaged`` (if given) instead of raising for text that is not
        UTF-8 (a damaged database)."""
        def attempt():
            try:
                return self._conn().execute(sql, params).fetchall()
            except self._sqlite3.OperationalError as exc:
                if damaged is _MISSING or "decode" not in str(exc):
                    raise
                return damaged
        return self._retry(attempt)

    # -- reading -----------------------------------------------------------------

    def load(self, sid):
        gate = _sqlite_gate
        gate.enter()
        try:
            row = self._conn().execute(_SQL_LOAD, (sid,)).fetchone()
        except self._sqlite3.Error:
            row = _MISSING                   # retried, or explained, below
        finally:
            gate.leave()
        if row is _MISSING:
            rows = self._query(_SQL_LOAD, (sid,), damaged=())
            row = rows[0] if rows else None
        if row is None:
            return None                      # missing, or not UTF-8 (damaged)
        created, expires, timeout, max_age, forward, data = row
        if (type(created) is not float or type(expires) is not float or type(timeout) is not float
                or type(max_age) is not float or type(data) is not str
                or not (forward is None or is_valid_session_id(forward))):
            return None                      # damaged: a damaged record loads as absent
        return Record(data, created, expires, timeout, max_age, forward)

    def _is_stored(self, sid):
        return bool(self._query(_SQL_EXISTS, (sid,)))

    def sids(self, now=None):
        now = time.time() if now is None else now
        sids = (row[0].decode("latin-1") for row in self._query(f"SELECT CAST(sid AS BLOB) {_SQL_LIVE}",
                                                                (now,)))
        return [sid for sid in sids if is_valid_session_id(sid)]

    def count(self, now=None):
        now = time.time() if now is None else now
        return self._query(f"SELECT count(*) {_SQL_LIVE}", (now,))[0][0]

    # -- writing -----------------------------------------------------------------

    def _insert(self, con, rows):
        try:
            con.executemany(_SQL_INSERT, rows)
        except self._sqlite3.IntegrityError:
            raise ContainerError("a session with this id exists already") from None

    @staticmethod
    def _row(sid, record, data=None):
        return (sid, record.created, record.expires, record.timeout, record.max_age, record.forward,
                record.data if data is None else data)

    def create(self, sid, record):
        self._transaction(self._insert, [self._row(sid, record)])

    def _bulk_create(self, records):
        """Store many new ``(sid, Record)`` pairs in one transaction (tests and imports)."""
        rows = sorted(self._row(sid, rec) for sid, rec in records)   # the B-trees grow at their right edge
        self._transaction(self._insert, rows)

    def _current(self, con, sid, now):
        """The stored data text of ``sid`` if its record is ``writable(now)``, else None (missing, a
        tombstone, expired or damaged: never written over)."""
        try:
            row = con.execute(_SQL_CURRENT, (sid,)).fetchone()
        except self._sqlite3.OperationalError as exc:
            if "decode" not in str(exc):
                raise
            return None                      # not UTF-8: damaged
        if row is None or row[1] is not None or type(row[0]) is not float or row[0] < now \
                or type(row[2]) is not str:
            return None
        return row[2]

    def _merge(self, con, sid, changed, deleted, meta, now, base):
        text = self._current(con, sid, now)
        if text is None:
            return False                     # missing, a tombstone or expired: never resurrected
        try:
            data = _merge_data(text, changed, deleted, base)
        except ValueError:
            return False                     # damaged JSON: loads as absent, so never written over
        con.execute(_SQL_REWRITE, (meta.created, meta.expires, meta.timeout, meta.max_age, meta.forward,
                                   data, sid))
        return True

    def update(self, sid, changed, deleted, meta, now, held=None, base=None):
        # The common case is one statement, without an explicit transaction: when the stored text is still
        # the one this block loaded (``base``), the merge is the block's own dict, so it is written with
        # that condition in the UPDATE itself (encoded before, so SQLite's write lock covers SQL only).
        # Otherwise (a concurrent write-back landed since) one transaction re-reads the record, merges
        # only this block's keys into it and writes it: SQLite's write lock makes it atomic, so a
        # merge-mode write-back takes no session lock (see the class docstring).
        if base is not None:
            data = base[0] if not changed and not deleted else _encode_fast(base[1])
            params = (meta.created, meta.expires, meta.timeout, meta.max_age, meta.forward, data, sid,
                      base[0], now)
            gate = _sqlite_gate
            gate.enter()
            try:
                swapped = self._conn().execute(_SQL_SWAP, params).rowcount == 1
            except self._sqlite3.Error:
                swapped = None               # retried, or explained, below
            finally:
                gate.leave()
            if swapped is None:
                swapped = self._retry(lambda: self._conn().execute(_SQL_SWAP, params).rowcount == 1)
            if swapped:
                return True
        return self._transaction(self._merge, sid, changed or {}, deleted or (), meta, now, base)

    def _rotate_rows(self, con, old, new, changed, deleted, meta, tombstone, now, base):
        text = self._current(con, old, now)
        if text is None:
            return False                     # missing, a tombstone or expired: never resurrected
        try:
            data = _merge_data(text, changed, deleted, base)
        except ValueError:
            return False                     # damaged JSON: loads as absent
        con.execute(_SQL_INSERT, self._row(new, meta, data))
        if tombstone is None:
            con.execute(_SQL_DELETE_SESSION, (old,))
        else:
            con.execute(_SQL_REWRITE, self._row(old, tombstone)[1:] + (old,))
        return True

    def rotate(self, old, new, changed, deleted, meta, tombstone, now, held=None, base=None):
        # One transaction: no write-back of ``old`` can land between the copy and the tombstone.
        try:
            return self._transaction(self._rotate_rows, old, new, changed or {}, deleted or (), meta,
                                     tombstone, now, base)
        except ContainerError as exc:
            if isinstance(exc.__cause__, self._sqlite3.IntegrityError):
                raise ContainerError(f"session {_short(new)} exists already") from None
            raise

    def touch(self, sid, expires, timeout=None, now=None, held=None):
        return self._retry(lambda: self._conn().execute(
            _SQL_TOUCH, (expires, sid, expires, timeout, timeout, now, now)).rowcount == 1)

    @staticmethod
    def _delete_rows(con, sid):
        row = con.execute("SELECT CAST(forward AS BLOB) FROM sessions WHERE sid = ?", (sid,)).fetchone()
        forward = row and row[0] and row[0].decode("latin-1")
        for victim in (sid, forward) if forward and is_valid_session_id(forward) else (sid,):
            con.execute(_SQL_DELETE_SESSION, (victim,))

    def delete(self, sid, held=None):
        handle = held or self._stripes.acquire(sid, DEFAULTS["lock_timeout"])
        try:
            self._transaction(self._delete_rows, sid)
        finally:
            if held is None:
                handle.release()

    # -- expiry ------------------------------------------------------------------

    @staticmethod
    def _reap_rows(con, sids, cutoff):
        removed = 0
        for sid in sids:
            key = sid if type(sid) is bytes else sid.encode("ascii")
            removed += con.execute(_SQL_REAP_ONE, (key, cutoff)).rowcount
        return removed

    def _last_reap(self):
        rows = self._query("SELECT value FROM meta WHERE name = 'last_reap'", ())
        return rows[0][0] if rows else None

    def _mark_reap(self, now):
        self._transaction(lambda con: con.execute("INSERT OR REPLACE INTO meta VALUES ('last_reap', ?)",
                                                  (now,)))

    def _expired(self, cutoff, cursor):
        expires, sid = cursor or (float("-inf"), b"")
        rows = self._query(_SQL_EXPIRED, (cutoff, expires, sid, _REAP_BATCH))
        sids, damaged = [], []
        for _, key in rows:
            sid = key.decode("latin-1")
            if is_valid_session_id(sid):
                sids.append(sid)
            else:
                damaged.append(key)          # no session has that id, so no lock guards it
        removed = self._transaction(self._reap_rows, damaged, cutoff) if damaged else 0
        return sids, (rows[-1] if rows else None), removed

    def _remove(self, sids, cutoff):
        return self._transaction(self._reap_rows, sids, cutoff)

    def _reaped(self, removed):
        """Checkpoint the WAL and truncate it, if that needs no waiting (see _SQLITE_WAL_LIMIT): with
        readers or a writer at work it is left to the next reap."""
        def checkpoint():
            con = self._conn()
            con.execute("PRAGMA busy_timeout=0")
            try:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except self._sqlite3.OperationalError as exc:
                if not _sqlite_busy(exc):
                    raise
            finally:
                con.execute(f"PRAGMA busy_timeout={int(DEFAULTS['sqlite_busy_timeout'] * 1000)}")
        self._retry(checkpoint)


# LMDB ----------------------------------------------------------------------------------
# Layout: PATH is a directory holding LMDB's data.mdb and lock.mdb, and locks/ with the stripe and reaper
# lock files. Three named databases:
#
#     sessions   sid -> header + data. The header packs created, expires, timeout, max_age (little-endian
#                doubles) and the forward id (44 NUL bytes for none); the data is the session's JSON text.
#     expiry     expires as a big-endian double, then the sid -> b"". Positive doubles in big-endian
#                order sort like their values, so the expired sessions are the first keys.
#     meta       b"last_reap" -> the wall time the last reap started (a little-endian double).
#
# A record and its expiry entry change in the same transaction, so the index is exact.
#
# One Environment per (process, real path), shared by the threads and containers of the process
# (py-lmdb: opening a path twice in one process is "a serious error"). It never crosses fork(): a child
# that finds its parent's environment in the table closes that copy (py-lmdb refuses to open a path that is
# open in the process, the inherited copy included) and opens its own. The copy holds no reader slot
# (max_spare_txns=0 and no transaction outlives a call) and no transaction was in flight at the fork (see
# "fork()" above), so closing it neither waits nor releases anything of the parent's.

_LMDB_HEADER = struct.Struct("<dddd44s")
_LMDB_EXPIRES = struct.Struct("<d")           # the header's expires field, at offset 8
_EXPIRY_KEY = struct.Struct(">d")
_NO_FORWARD = bytes(44)
_LMDB_RETRIES = 8          # map resizes in a row before giving up on one operation

_lmdb_envs = {}            # real path -> _LMDBEnv of this process
_lmdb_envs_lock = _thread.allocate_lock()


def _lmdb_value(record, data=None):
    """Pack a Record (with ``data`` as UTF-8 bytes instead of ``record.data`` if given)."""
    forward = _NO_FORWARD if record.forward is None else record.forward.encode("ascii")
    head = _LMDB_HEADER.pack(record.created, record.expires, record.timeout, record.max_age, forward)
    return head + (record.data.encode("utf-8") if data is None else data)


def _lmdb_header(value):
    """``(created, expires, timeout, max_age, forward id or None)`` of a packed record, or None if the
    header is damaged (a disk fault, a stray write): too short, a number that is not finite (x - x is NaN
    for an infinity or NaN) or a forward that is not a session id."""
    if len(value) < _LMDB_HEADER.size:
        return None
    created, expires, timeout, max_age, forward = _LMDB_HEADER.unpack_from(value)
    if (created - created) + (expires - expires) + (timeout - timeout) + (max_age - max_age) != 0.0:
        return None
    if forward == _NO_FORWARD:
        return created, expires, timeout, max_age, None
    forward = forward.decode("latin-1")
    return (created, expires, timeout, max_age, forward) if is_valid_session_id(forward) else None


def _lmdb_record(value):
    """The Record of a packed value, or None if it is damaged: a damaged record loads as absent."""
    header = _lmdb_header(value)
    if header is None:
        return None
    try:
        data = value[_LMDB_HEADER.size:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Record(data, *header)


def _lmdb_merge(value, changed, deleted, meta, now, base=None):
    """The packed record after a write-back, or None if ``value`` is damaged, a tombstone or expired at
    ``now``."""
    header = _lmdb_header(value)
    if header is None or header[4] is not None or header[1] < now:
        return None
    data = value[_LMDB_HEADER.size:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None                      # damaged: absent, so never written over (as if missing)
    if changed or deleted:
        data = _merge_data(text, changed, deleted, base).encode("utf-8")
    return _lmdb_value(meta, data)


def _lmdb_sid(key):
    """The session id at the end of an expiry-index key, or None if that key is damaged."""
    sid = key[8:].decode("latin-1")
    return sid if is_valid_session_id(sid) else None


class _LMDBEnv:
    """The open environment of one path in this process, and its named databases."""

    __slots__ = ("pid", "env", "sessions", "expiry", "meta", "users", "gate", "busy_at_fork")

    def __init__(self, env, sessions, expiry, meta):
        self.pid, self.env, self.users, self.gate = os.getpid(), env, 0, _TxnGate()
        self.sessions, self.expiry, self.meta = sessions, expiry, meta
        self.busy_at_fork = False


#: LMDB 0.9's data-file meta page (format version 1), after the 16-byte page header: magic, version,
#: address, map size, then two 48-byte database records (the first one's first field is the page size),
#: the last page in use and the transaction id.
_LMDB_META = struct.Struct("<16xIIQQI44x48xQQ")
_LMDB_MAGIC = 0xBEEFC0DE


def _lmdb_check_size(path):
    """Return the map size recorded in ``path``'s data.mdb (0 if unknown), after checking that the file
    is not shorter than its last committed page: LMDB maps the file and would die of SIGBUS when it reads
    the missing pages, so a truncated file raises ContainerError. A missing or new file passes, and so
    does a format this check does not know (LMDB 1.0's), which LMDB then checks as well as it can."""
    data = os.path.join(path, "data.mdb")
    try:
        with open(data, "rb") as f:
            head = f.read(_LMDB_META.size)
            if len(head) < _LMDB_META.size:
                if not head:
                    return 0
                raise ContainerError(f"LMDB store {path!r}: data.mdb is truncated ({len(head)} bytes)")
            magic, version, _, _, page, _, _ = _LMDB_META.unpack(head)
            if magic != _LMDB_MAGIC or version != 1 or page < _LMDB_META.size or page & (page - 1):
                return 0
            f.seek(page)
            metas = [head, f.read(_LMDB_META.size)]
            # The size only after the meta pages: a writer extends the file before it writes a meta
            # page that names the new pages, so a concurrent commit never looks like a truncation.
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0
        raise ContainerError(f"cannot read LMDB store {path!r}: {exc}") from exc
    valid = [_LMDB_META.unpack(meta) for meta in metas if len(meta) == _LMDB_META.size]
    valid = [(txnid, last, map_size) for magic, version, _, map_size, _, last, txnid in valid
             if magic == _LMDB_MAGIC and version == 1]
    _, last, map_size = max(valid)
    needed = (last + 1) * page
    if size < needed:
        raise ContainerError(f"LMDB store {path!r}: data.mdb is truncated ({size} bytes, its last committed "
                             f"page ends at {needed}); restore it from a backup, or remove the store")
    return map_size


def _lmdb_open(lmdb, real, container):
    """Open the environment at ``real`` and its named databases: ``(env, [sessions, expiry, meta])``.

    The map is at least as large as the one another process recorded in the file: a map sized to the
    data alone fails the first transaction (MDB_MAP_RESIZED) as soon as another process writes one more
    page. The file is checked before it is mapped (``_lmdb_check_size``)."""
    for _ in range(_LMDB_RETRIES):
        map_size = max(container.map_size, _lmdb_check_size(real))
        env = None
        try:
            env = lmdb.open(real, subdir=True, map_size=map_size, max_dbs=4,
                            max_readers=container.max_readers, max_spare_txns=0, mode=0o600,
                            sync=container.sync, metasync=container.metasync, readahead=False, lock=True)
            env.reader_check()                 # slots of killed processes
            with env.begin(write=True) as txn:
                return env, [env.open_db(name, txn=txn) for name in (b"sessions", b"expiry", b"meta")]
        except BaseException as exc:
            if env is not None:
                env.close()                    # else py-lmdb refuses every later open in this process
            if not isinstance(exc, lmdb.MapResizedError):
                if isinstance(exc, lmdb.Error):
                    raise ContainerError(f"cannot open LMDB store {container.path!r}: {exc}") from exc
                raise
            # Another process grew the map between our mapping the file and our first transaction
            # (lmdb.open begins one too): open again, which maps the new size.
    raise ContainerError(f"cannot open LMDB store {container.path!r}: its map kept growing while it "
                         f"was being opened")


def _lmdb_attach(lmdb, container):
    """Return this process's _LMDBEnv of ``container.path``, opening it if needed (counts a user)."""
    real = os.path.realpath(container.path)
    with _lmdb_envs_lock:
        shared = _lmdb_envs.get(real)
        if shared is not None and shared.pid != os.getpid():
            if shared.busy_at_fork:
                raise ContainerError(f"LMDB store {container.path!r}: this process was forked while another "
                                     f"thread was inside LMDB, so the environment it inherited cannot be "
                                     f"closed; open the store after fork(), or fork outside database calls")
            del _lmdb_envs[real]
            try:
                shared.env.close()      # the inherited copy: see the comment at the top of this part
            except lmdb.Error:
                pass
            shared = None
        if shared is None:
            env, dbs = _lmdb_open(lmdb, real, container)
            shared = _lmdb_envs[real] = _LMDBEnv(env, *dbs)
        shared.users += 1
        return shared


def _lmdb_detach(shared):
    with _lmdb_envs_lock:
        if shared.pid != os.getpid():
            return                      # the parent's copy: left alone, replaced on the next attach
        shared.users -= 1
        if shared.users <= 0:
            for real, other in list(_lmdb_envs.items()):
                if other is shared:
                    del _lmdb_envs[real]
            shared.env.close()


class LMDBContainer(_DatabaseContainer):
    """Sessions in an LMDB environment: the fastest store for many processes and millions of sessions.

    :param path: the store directory (created 0700; refused if a symlink, another user's, or writable
        by others). It holds data.mdb, lock.mdb and ``locks/``.
    :param durable: also sync LMDB's meta page on every commit (``metasync=True``), so that a power loss
        keeps every acknowledged write.
    :param sync: fsync the data on every commit (default True). ``sync=False`` makes writes much faster
        and is still safe against killed processes, but an OS crash or power loss may then corrupt the
        environment, losing every session; choose it only for sessions you can afford to lose at once.
    :param metasync: default ``durable``. With ``sync=True, metasync=False`` (the default) a power loss
        may undo the last commit but never corrupts the environment (LMDB's MDB_NOMETASYNC).
    :param map_size: bytes of address space to map at first, ``DEFAULTS["lmdb_map_size"]``. The file
        grows with use, not to this size; when the map is full it is doubled and the write retried, and
        other processes follow (MapResizedError). Every process should use the same setting.
    :param max_readers: concurrent read transactions of all processes, ``DEFAULTS["lmdb_max_readers"]``;
        fixed by the first process that opens the environment.

    Guarantees:

    * Atomicity: every write is one LMDB write transaction: a record and its expiry entry change
      together, and readers (never blocked) see the state before or after it.
    * Locking: a session's lock (exclusive mode, ``delete``, the reaper) is a stripe lock file (see
      "Database containers" above); LMDB's single writer lock is held only for each short transaction,
      never while user code runs. A merge write-back is one write transaction (read the record, apply
      the block's changed and deleted keys, write); LMDB's writer lock makes it atomic, so it takes no
      session lock and may land while an exclusive block of the same session runs. Nothing is lost
      either way: each write-back applies only its own keys.
    * Crashes: a process killed at any instant leaves the last committed state; its session locks die
      with it and its stale reader slots are cleared (``reader_check``) on open and by ``reap()``.
    * Processes and threads: one environment per process, shared by its threads and reopened after
      ``fork()``, which waits for the transactions of other threads in flight; ``max_spare_txns=0`` so
      no reader slot crosses a fork (see "fork()" above).
    * Expiry is indexed: ``reap()`` costs O(expired sessions), and ``touch`` rewrites one record.

    Needs ``pip install lmdb`` (imported only when this container is made). Not for NFS or SMB.
    """

    def __init__(self, path, durable=None, sync=None, metasync=None, map_size=None, max_readers=None,
                 create=True):
        self._lmdb = _require("lmdb", "lmdb")
        self.path = os.path.abspath(os.fspath(path))
        self.durable = DEFAULTS["durable"] if durable is None else bool(durable)
        self.sync = True if sync is None else bool(sync)
        self.metasync = self.durable if metasync is None else bool(metasync)
        self.map_size = int(DEFAULTS["lmdb_map_size"] if map_size is None else map_size)
        self.max_readers = int(DEFAULTS["lmdb_max_readers"] if max_readers is None else max_readers)
        _check_store_dir(self.path, create)
        self._stripes = _StripeLocks(os.path.join(self.path, "locks"), create)
        self.last_reap_visited = 0
        _watch_fork()
        self._shared = _lmdb_attach(self._lmdb, self)

    def __reduce__(self):
        return (LMDBContainer, (self.path, self.durable, self.sync, self.metasync, self.map_size,
                                self.max_readers, False))

    def __repr__(self):
        return f"LMDBContainer({self.path!r})"

    def close(self):
        """Release this container's use of the environment (closed when no container of the process
        uses it). The container reopens it on demand."""
        shared, self._shared = self._shared, None
        if shared is not None:
            _lmdb_detach(shared)

    # -- transactions ------------------------------------------------------------

    def _env(self):
        shared = self._shared
        if shared is None or shared.pid != os.getpid():
            shared = self._shared = _lmdb_attach(self._lmdb, self)
        return shared

    def _txn(self, work, write=False):
        """Run ``work(txn, env)`` in one transaction, growing or re-reading the map size as needed."""
        lmdb = self._lmdb
        for _ in range(_LMDB_RETRIES):
            shared = self._env()
            shared.gate.enter()
            try:
                with shared.env.begin(write=write) as txn:
                    return work(txn, shared)
            except lmdb.MapFullError:
                size = shared.env.info()["map_size"] * 2
            except lmdb.MapResizedError:
                size = 0                              # another process grew it: adopt its size
            except lmdb.Error as exc:
                raise ContainerError(f"LMDB store {self.path!r}: {exc}") from exc
            finally:
                shared.gate.leave()
            shared.gate.alone(lambda: self._resize(shared, size))
        raise ContainerError(f"LMDB store {self.path!r}: the map kept filling up while being resized")

    def _resize(self, shared, size):
        try:
            if not size:
                shared.env.set_mapsize(0)
            elif shared.env.info()["map_size"] < size:
                shared.env.set_mapsize(size)
        except self._lmdb.Error as exc:
            raise ContainerError(f"cannot resize the LMDB map of {self.path!r}: {exc}") from exc

    def _get(self, key):
        return self._txn(lambda txn, env: txn.get(key, db=env.sessions))

    # -- reading -----------------------------------------------------------------

    def load(self, sid):
        value = self._get(sid.encode("ascii"))
        return None if value is None else _lmdb_record(value)       # damaged: None too

    def _is_stored(self, sid):
        return self._get(sid.encode("ascii")) is not None

    def sids(self, now=None):
        start = _EXPIRY_KEY.pack(time.time() if now is None else now)

        def live(txn, env):
            cursor = txn.cursor(db=env.expiry)
            if not cursor.set_range(start):
                return []
            sids = (_lmdb_sid(key) for key in cursor.iternext(keys=True, values=False))
            return [sid for sid in sids if sid is not None]
        return self._txn(live)

    def count(self, now=None):
        limit = _EXPIRY_KEY.pack(time.time() if now is None else now)

        def unexpired(txn, env):
            expired = 0
            for key in txn.cursor(db=env.expiry).iternext(keys=True, values=False):
                if key >= limit:
                    break
                expired += 1
            return txn.stat(env.expiry)["entries"] - expired
        return self._txn(unexpired)

    # -- writing -----------------------------------------------------------------

    @staticmethod
    def _put_new(txn, env, key, value):
        if not txn.put(key, value, db=env.sessions, overwrite=False):
            raise ContainerError(f"session {_short(key.decode('ascii'))} exists already")
        txn.put(_EXPIRY_KEY.pack(_LMDB_EXPIRES.unpack_from(value, 8)[0]) + key, b"", db=env.expiry)

    def create(self, sid, record):
        key, value = sid.encode("ascii"), _lmdb_value(record)
        self._txn(lambda txn, env: self._put_new(txn, env, key, value), write=True)

    def _bulk_create(self, records):
        """Store many new ``(sid, Record)`` pairs in one transaction (tests and imports)."""
        items = [(sid.encode("ascii"), _lmdb_value(record)) for sid, record in records]

        def put_all(txn, env):
            for key, value in items:
                self._put_new(txn, env, key, value)
        self._txn(put_all, write=True)

    @staticmethod
    def _replace(txn, env, key, old, new):
        """Write ``new`` over the record ``old`` of ``key``, moving its expiry entry."""
        old_expires = _LMDB_EXPIRES.unpack_from(old, 8)[0]
        new_expires = _LMDB_EXPIRES.unpack_from(new, 8)[0]
        if old_expires != new_expires:
            txn.delete(_EXPIRY_KEY.pack(old_expires) + key, db=env.expiry)
            txn.put(_EXPIRY_KEY.pack(new_expires) + key, b"", db=env.expiry)
        txn.put(key, new, db=env.sessions)

    def update(self, sid, changed, deleted, meta, now, held=None, base=None):
        # One write transaction: read the record, merge, write. LMDB's writer lock makes it atomic, so a
        # merge-mode write-back takes no session lock (see the class docstring); ``held`` is the lock of
        # an exclusive block, which this write then completes.
        key = sid.encode("ascii")

        def write(txn, env):
            current = txn.get(key, db=env.sessions)
            new = current and _lmdb_merge(current, changed, deleted, meta, now, base)
            if not new:
                return False                 # missing, a tombstone or expired: never resurrected
            self._replace(txn, env, key, current, new)
            return True
        return self._txn(write, write=True)

    def rotate(self, old, new, changed, deleted, meta, tombstone, now, held=None, base=None):
        # One write transaction: no write-back of ``old`` can land between the copy and the tombstone.
        old_key, new_key = old.encode("ascii"), new.encode("ascii")

        def write(txn, env):
            current = txn.get(old_key, db=env.sessions)
            moved = current and _lmdb_merge(current, changed, deleted, meta, now, base)
            if not moved:
                return False                 # missing, a tombstone or expired: never resurrected
            self._put_new(txn, env, new_key, moved)
            if tombstone is None:
                self._delete_record(txn, env, old_key)
            else:
                self._replace(txn, env, old_key, current, _lmdb_value(tombstone))
            return True
        return self._txn(write, write=True)

    def touch(self, sid, expires, timeout=None, now=None, held=None):
        key = sid.encode("ascii")
        packed = _LMDB_EXPIRES.pack(expires)

        def push(txn, env):
            current = txn.get(key, db=env.sessions)
            record = current and _lmdb_record(current)
            if not record:
                return False                     # missing or damaged (absent)
            stored_expires, stored_timeout = record.expires, record.timeout
            if (record.forward is None and stored_expires < expires
                    and (now is None or stored_expires >= now)
                    and (timeout is None or stored_timeout == timeout)):
                self._replace(txn, env, key, current, current[:8] + packed + current[16:])
                return True
            return False
        return self._txn(push, write=True)

    def _delete_record(self, txn, env, key):
        current = txn.get(key, db=env.sessions)
        if current is not None:
            header = _lmdb_header(current)
            if header is not None:    # (a damaged header's index entry is left to the reaper, which
                txn.delete(_EXPIRY_KEY.pack(header[1]) + key, db=env.expiry)   # drops dangling ones)
            txn.delete(key, db=env.sessions)
        return current

    def _delete_session(self, txn, env, key):
        """Delete a record and, if it is a tombstone, the record it forwards to."""
        current = self._delete_record(txn, env, key)
        header = current and _lmdb_header(current)
        if header and header[4] is not None:
            self._delete_record(txn, env, header[4].encode("ascii"))

    def delete(self, sid, held=None):
        key = sid.encode("ascii")
        handle = held or self._stripes.acquire(sid, DEFAULTS["lock_timeout"])
        try:
            self._txn(lambda txn, env: self._delete_session(txn, env, key), write=True)
        finally:
            if held is None:
                handle.release()

    # -- expiry ------------------------------------------------------------------

    def _last_reap(self):
        last = self._txn(lambda txn, env: txn.get(b"last_reap", db=env.meta))
        return None if last is None else _LMDB_EXPIRES.unpack(last)[0]

    def _mark_reap(self, now):
        self._txn(lambda txn, env: txn.put(b"last_reap", _LMDB_EXPIRES.pack(now), db=env.meta), write=True)

    def _expired(self, cutoff, cursor):
        limit = _EXPIRY_KEY.pack(cutoff)
        keys = self._txn(lambda txn, env: self._expired_keys(txn, env, cursor or b"", limit))
        self._index_keys = {}                # sid -> its expiry-index key, for the batch at hand
        damaged = []
        for key in keys:
            sid = _lmdb_sid(key)
            if sid is None:
                damaged.append(key)          # names no session, so no lock guards it
            else:
                self._index_keys[sid] = key
        if damaged:
            self._txn(lambda txn, env: [txn.delete(key, db=env.expiry) for key in damaged], write=True)
        return list(self._index_keys), (keys[-1] + b"\x00" if keys else None), 0

    def _remove(self, sids, cutoff):
        items = [(sid, self._index_keys[sid]) for sid in sids]
        return self._txn(lambda txn, env: self._reap_batch(txn, env, items, cutoff), write=True)

    def _reaped(self, removed):
        """Clear the reader slots that killed processes left behind (LMDB cannot tell them by itself)."""
        shared = self._env()
        shared.gate.enter()
        try:
            shared.env.reader_check()
        except self._lmdb.Error as exc:
            raise ContainerError(f"LMDB store {self.path!r}: {exc}") from exc
        finally:
            shared.gate.leave()

    @staticmethod
    def _expired_keys(txn, env, after, limit):
        cursor = txn.cursor(db=env.expiry)
        keys = []
        if cursor.set_range(after):
            for key in cursor.iternext(keys=True, values=False):
                if key >= limit or len(keys) == _REAP_BATCH:
                    break
                keys.append(key)
        return keys

    @staticmethod
    def _reap_batch(txn, env, items, cutoff):
        """Delete the sessions of ``items`` (sid, the expiry-index key it was found under) that are
        still expired before ``cutoff``. A record whose header is damaged loads as absent and its index entry
        says it expired: it goes too. An index entry whose record is missing or says otherwise goes."""
        removed = 0
        for sid, index_key in items:
            key = sid.encode("ascii")
            current = txn.get(key, db=env.sessions)
            header = None if current is None else _lmdb_header(current)
            if header is None:
                txn.delete(index_key, db=env.expiry)
                if current is not None:
                    txn.delete(key, db=env.sessions)
                    removed += 1
                continue
            stored_key = _EXPIRY_KEY.pack(header[1]) + key
            if stored_key != index_key:
                txn.delete(index_key, db=env.expiry)              # a stale entry
            if header[1] < cutoff:
                txn.delete(stored_key, db=env.expiry)
                txn.delete(key, db=env.sessions)
                removed += 1
        return removed


# Redis --------------------------------------------------------------------------------
# Layout: one hash per session, PREFIX{TAG}sid, and its lock PREFIX{TAG}sid:lock, where TAG is the
# sid's first 4 characters. The braces make TAG the Redis Cluster hash tag: Redis hashes only what is
# between them, so all keys of one session sit in one slot. A rotation writes two sessions in one
# script (the new record and the old id's tombstone), and delete() of a tombstone removes the session
# it forwards to in the same script; so the ids of one rotation chain share their TAG: new_id() keeps
# the first 4 characters of the id it replaces (see "Session ids" for why that costs no safety), and
# rotate() refuses a new id with another TAG. The tag cannot be a stored mapping (old id -> slot):
# a load of the new id must find its key from the id alone. 4 characters are 2**24 tags, so sessions
# spread evenly over the 16384 slots. Hash fields:
#
#     c, e, t, m, f   created, expires, timeout, max_age (repr of the float) and forward ("" for none)
#     n               the last key sequence number handed out
#     "key"           one field per session key, named by the key's JSON text (so it starts with '"' and
#                     never meets a metadata name); its value is "<seq>:<the value's JSON text>".
#
# A load is one script that returns the hash as it is, in one string; the client orders the key fields by
# their sequence number (_redis_record), so keys keep their insertion order, as in SQLite and LMDB.
# Every write is one Lua script (EVALSHA, then EVAL when the server does not know it: after a restart or
# failover), and every script checks all its conditions before its first write, so an error leaves
# nothing half-applied. Over maxmemory, Redis
# refuses a script's first command that may grow memory (OOM) and lets a script finish once it has
# written; so every script writes its growing commands first (HSET before HDEL) and a write-back that
# adds or changes a key is refused whole, while one that only deletes keys still goes through.
#
# No resurrection: update, touch and rotate check inside the script that the record exists, is no
# tombstone and is not expired at the caller's ``now``; delete() removes the hash, so a late write-back
# finds nothing to write to. Expiry is the caller's (the ``e`` field, compared with the ``now`` it
# passes); Redis' own TTL only collects the garbage: each write sets it to the record's remaining
# lifetime by the writer's clock plus DEFAULTS["reap_margin"] (PEXPIRE, relative: hosts whose clocks
# disagree with the server's still agree on durations), so an abandoned session disappears by itself
# and reap() has only sessions inside that margin left to remove.
#
# Exclusive mode: the lock is a string key set with NX and a lease (PX); its value is a random owner
# token. See RedisContainer for the renewal and the fencing.

_REDIS_CHECKS = """
local function live(key, now)
  local m = redis.call('HMGET', key, 'e', 'f')
  local e = tonumber(m[1])
  return e and m[2] == '' and e >= tonumber(now)
end
local function owned(lock, token)
  return token == '' or redis.call('GET', lock) == token
end
local function hset_all(key, argv, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call('HSET', key, unpack(argv, i, j))
    i = j + 1
  end
end
local function apply(key, argv, at)
  local nd = tonumber(argv[at])
  for i = at + nd + 1, #argv, 2 do
    local old = redis.call('HGET', key, argv[i])
    local seq = old and string.match(old, '^(%d+):') or redis.call('HINCRBY', key, 'n', 1)
    redis.call('HSET', key, argv[i], seq .. ':' .. argv[i + 1])
  end
  for i = at + 1, at + nd do redis.call('HDEL', key, argv[i]) end
end
"""

_REDIS_SCRIPTS = {
    # KEYS: hash -> false, or {number of strings, the hash's fields and values joined by newlines}. No
    # string sesskit writes holds a newline (JSON escapes it), so the client splits them back and orders
    # the keys by sequence (_redis_record); a reply of two strings costs redis-py far less to parse than
    # HGETALL's one string per field (its parser is pure Python without hiredis), and the server does no
    # per-field string work (ordering and joining 20 keys in Lua took 3/4 of this script's 50 us).
    # It writes nothing, so replicas run it.
    "load": """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
return {#h, table.concat(h, '\\n')}
""",
    # KEYS: hash. ARGV: ttl_ms, field, value, ... -> 1 stored, 0 exists already
    "create": """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
hset_all(KEYS[1], ARGV, 2, #ARGV)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
""",
    # KEYS: hash, lock. ARGV: now, token, ttl_ms, c, e, t, m, f, n_deleted, deleted..., field, json, ...
    # -> 1 written, 0 missing/tombstone/expired, -1 the lock (token) is no longer ours
    "update": """
if not owned(KEYS[2], ARGV[2]) then return -1 end
if not live(KEYS[1], ARGV[1]) then return 0 end
apply(KEYS[1], ARGV, 9)
redis.call('HSET', KEYS[1], 'c', ARGV[4], 'e', ARGV[5], 't', ARGV[6], 'm', ARGV[7], 'f', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""",
    # KEYS: old hash, old lock, new hash. ARGV: now, token, new ttl_ms, new c, e, t, m,
    # tombstone ttl_ms ('' = delete old), its c, e, t, m, f, n_deleted, deleted..., field, json, ...
    # -> 1 done, 0 old not writable, -1 lock lost, -2 new exists already
    "rotate": """
if not owned(KEYS[2], ARGV[2]) then return -1 end
if not live(KEYS[1], ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
apply(KEYS[1], ARGV, 14)
redis.call('HSET', KEYS[1], 'c', ARGV[4], 'e', ARGV[5], 't', ARGV[6], 'm', ARGV[7], 'f', '')
redis.call('RENAME', KEYS[1], KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'c', ARGV[9], 'e', ARGV[10], 't', ARGV[11], 'm', ARGV[12], 'f', ARGV[13],
             'n', '0')
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
end
return 1
""",
    # KEYS: hash, lock. ARGV: expires, timeout or '', now or '', token, margin_ms or ttl_ms
    # -> 1 pushed, 0 left alone, -1 lock lost
    "touch": """
if not owned(KEYS[2], ARGV[4]) then return -1 end
local m = redis.call('HMGET', KEYS[1], 'e', 't', 'f')
local stored = tonumber(m[1])
if not stored or m[3] ~= '' then return 0 end
if stored >= tonumber(ARGV[1]) then return 0 end
if ARGV[3] ~= '' and stored < tonumber(ARGV[3]) then return 0 end
if ARGV[2] ~= '' and tonumber(m[2]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'e', ARGV[1])
if ARGV[3] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
else
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    redis.call('PEXPIRE', KEYS[1], left + math.floor((tonumber(ARGV[1]) - stored) * 1000))
  end
end
return 1
""",
    # KEYS: hash, lock[, the hash a tombstone forwards to]. ARGV: token, the forward id read before
    # ('' = none) -> 1 deleted (or absent), 0 the forward changed meanwhile (read again), -1 lock lost
    "delete": """
if not owned(KEYS[2], ARGV[1]) then return -1 end
local f = redis.call('HGET', KEYS[1], 'f')
if (f or '') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' and KEYS[3] then redis.call('DEL', KEYS[3]) end
return 1
""",
    # KEYS: hash, lock. ARGV: token, lease_ms -> 1 locked, 0 held by another, -1 no such session
    "lock": """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
""",
    # KEYS: lock. ARGV: token, lease_ms ('' = release) -> 1 done, 0 not ours (any more)
    "lease": """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
""",
    # KEYS: hash, lock. ARGV: now -> 1 removed, 0 not expired, absent, or locked (in use)
    "reap": """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local e = tonumber(redis.call('HGET', KEYS[1], 'e'))
if e and e < tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]) return 1 end
return 0
""",
}

#: The scripts that write a session: with ``replicas=N`` each is followed by WAIT.
_REDIS_WRITES = frozenset(("create", "update", "rotate", "touch", "delete"))

#: redis-py exception -> the Redis error code it stands for, named in StoreUnavailable's message.
#: Each means the store is unavailable for now. ClusterError is redis-py's "TTL exhausted": it
#: followed MOVED/ASK redirections or retried TRYAGAIN as often as it will (a slot moving between
#: nodes, or nodes that disagree).
_REDIS_CODES = {"ReadOnlyError": "READONLY", "OutOfMemoryError": "OOM", "BusyLoadingError": "LOADING",
                "MasterDownError": "MASTERDOWN", "TryAgainError": "TRYAGAIN",
                "ClusterDownError": "CLUSTERDOWN", "ClusterError": "MOVED/ASK/TRYAGAIN",
                "MovedError": "MOVED", "AskError": "ASK", "SlotNotCoveredError": "CLUSTERDOWN"}

#: Characters of a session id that make its Redis Cluster hash tag (see the layout above).
_REDIS_TAG = 4


def _redis_record(reply):
    """Build a Record from the reply of the "load" script; None if there is no session, or if the hash
    is not one this container wrote (a field or value with a newline, a sequence number that is not
    decimal, repeated, or outside 1..n, missing metadata): a damaged session loads as absent."""
    if not reply:
        return None
    try:
        count, joined = reply
        items = joined.decode("utf-8").split("\n")
        if len(items) != count:
            return None
        meta, keys = {}, []
        for i in range(0, count, 2):
            field, value = items[i], items[i + 1]
            if field[:1] == '"':
                digits, colon, json_text = value.partition(":")
                if not (colon and digits.isascii() and digits.isdigit()):
                    return None
                keys.append((int(digits), field, json_text))
            else:
                meta[field] = value
        keys.sort()
        last = meta["n"]
        if not (last.isascii() and last.isdigit()):
            return None
        if keys and (keys[0][0] < 1 or keys[-1][0] > int(last)
                     or any(a[0] == b[0] for a, b in zip(keys, keys[1:]))):
            return None
        data = "{" + ",".join([f"{field}:{json_text}" for _, field, json_text in keys]) + "}"
        created, expires, timeout, max_age = (float(meta[name]) for name in "cetm")
        forward = meta["f"]
        if not forward.isascii():
            return None
        return Record(data, created, expires, timeout, max_age, forward or None)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None                                   # not written by this container: no session


def _redis_fields(data_text):
    """The key fields of a session's JSON text: [field, "seq:json", ...] and the last seq."""
    flat = []
    seq = 0
    for seq, (key, value) in enumerate(_decode_fast(data_text).items(), 1):
        flat += (_encode_str(key), f"{seq}:{_encode_fast(value)}")
    return flat, seq


def _redis_changes(changed, deleted):
    """Script arguments for a write-back's deleted and changed keys."""
    args = [len(deleted or ())]
    args += [_encode_str(key) for key in deleted or ()]
    for key, value in (changed or {}).items():
        args += (_encode_str(key), _encode_fast(value))
    return args


class _RedisLock:
    """A held session lock of a RedisContainer: its key, owner token and lease."""

    __slots__ = ("container", "sid", "key", "token", "renewed")

    def __init__(self, container, sid, key, token):
        self.container, self.sid, self.key, self.token = container, sid, key, token
        self.renewed = time.monotonic()

    def release(self):
        """Compare-and-delete: only the owner's token frees the lock. Never raises: a lock that
        cannot be released now frees itself when its lease ends."""
        token, self.token = self.token, None
        if token is None:
            return
        _lease_keeper.remove(self)
        try:
            self.container._run("lease", [self.key], [token, ""])
        except ContainerError:
            pass                      # unreachable now: the lock frees itself when its lease ends

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


class _LeaseKeeper:
    """A daemon thread per process that renews the lease of every held Redis lock every third of the
    lease, so an exclusive block may run longer than the lease. Started on first use, and anew in a
    forked child (a thread does not survive fork(), and the parent's locks are not the child's)."""

    def __init__(self):
        self._pid = None

    def _start(self):
        import threading
        self._pid = os.getpid()
        self._held = set()
        self._wake = threading.Condition()
        thread = threading.Thread(target=self._run, name="sesskit-redis-leases", daemon=True)
        thread.start()

    def add(self, handle):
        if self._pid != os.getpid():
            self._start()
        with self._wake:
            self._held.add(handle)
            self._wake.notify()

    def remove(self, handle):
        if self._pid == os.getpid():
            with self._wake:
                self._held.discard(handle)

    def _run(self):
        while True:
            with self._wake:
                while not self._held:
                    self._wake.wait()
                handles = list(self._held)
            now = time.monotonic()
            soonest = 1.0
            for handle in handles:
                period = handle.container.lease / 3
                due = handle.renewed + period - now
                if due <= 0:
                    token = handle.token
                    if token is None:
                        continue
                    try:
                        handle.container._run("lease", [handle.key],
                                              [token, int(handle.container.lease * 1000)])
                        handle.renewed = now
                    except ContainerError:      # the fenced write-back will tell, if it matters
                        pass
                    due = period
                soonest = min(soonest, max(due, 0.01))
            with self._wake:
                self._wake.wait(soonest)


_lease_keeper = _LeaseKeeper()


class RedisContainer(Container):
    """Sessions in Redis: one store shared by many hosts, with the same guarantees as on one machine.

    :param client_or_url: a ``redis://[:password@]host:port/db``, ``rediss://`` (TLS) or
        ``unix:///path/to/socket`` URL, a Sentinel URL (below), or a ``redis.Redis`` client, also one
        from ``redis.sentinel.Sentinel(...).master_for(name)``; for a Redis Cluster, a
        ``redis://host:port?cluster=1`` (or ``rediss://``) URL naming any one node, or a
        ``redis.cluster.RedisCluster`` client (give it several ``startup_nodes`` so that it can start
        while one node is down). URL query options go to redis-py, except ``prefix``, ``lease``,
        ``replicas`` and ``cluster``, which are this container's. A URL's client gets ``socket_timeout``
        and ``socket_connect_timeout`` of ``DEFAULTS["redis_socket_timeout"]`` unless the URL sets them,
        and no automatic retries (see Faults); a client you pass keeps its own settings.
    :param prefix: put before every key (several stores can share one database); no braces (they
        would make the prefix the Redis Cluster hash tag of every key).
    :param lease: seconds an exclusive lock outlives a holder that stops renewing it,
        ``DEFAULTS["redis_lease"]``.
    :param replicas: 0 (the default) or N: every write of a session (create, write-back, rotation,
        touch, delete) is followed by ``WAIT N`` on the same connection, and succeeds only once N
        replicas have it; if fewer confirm within ``DEFAULTS["redis_wait_timeout"]`` seconds (at most
        half the socket timeout) it raises ``StoreUnavailable``: the write is applied on the primary,
        and may reach the replicas or be lost in a failover, so its outcome is unknown.

    Sentinel URL: ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service?db=0`` names
    the Sentinels and the service (the ``sentinel monitor`` name); the client asks them for the
    primary of ``service`` on every new connection, so it follows a failover. The user and password
    are the Redis servers'; ``sentinel_password`` in the query is the Sentinels' own. The other query
    options go to the connections (``socket_*`` also to those to the Sentinels). No TLS in this form:
    pass a client made with ``Sentinel(..., ssl=True)`` instead.

    Guarantees:

    * Merge mode: a write-back is one Lua script, one round trip, that applies only the block's changed
      and deleted keys (one hash field each) to the record as it is on the server. No client-side lock,
      no WATCH: concurrent write-backs of one session from any number of hosts lose no key. As in LMDB,
      it takes no session lock, so it may land while an exclusive block of the same session runs.
    * No resurrection: a write-back, touch or rotation of a session that was deleted, rotated away or
      expired by the caller's clock writes nothing and reports it (checked inside the script).
    * Exclusive mode: ``lock`` sets ``PREFIX{TAG}sid:lock`` to a random owner token with ``NX`` and a lease
      of ``lease`` seconds; a waiter polls (0.5 ms growing to ``DEFAULTS["poll_interval"]``: one small
      script per try, so a lock held for a millisecond is picked up at once) until ``lock_timeout``,
      then LockTimeout. Only the owner releases it (compare-and-delete in a script). While held, a thread of
      the process renews the lease every ``lease/3`` seconds, so a long block keeps it and a killed
      holder frees it after at most ``lease`` seconds. Fencing: every write made under the lock
      (update, rotate, touch, delete with ``held``) checks inside its script that the lock key still
      holds the owner's token, and is refused with ``LockLost`` otherwise. What this cannot guarantee: a
      holder paused (stopped, swapped out, cut off from the server) for longer than its lease loses the
      lock, and another request may then run its block at the same time; the paused holder's write-back
      is then refused (its changes are lost and it is told), so no update is silently overwritten, but
      the two blocks did overlap. Locks are not waited for (``replicas``): a lock lost in a failover
      is a lock lost (``LockLost``), as above.
    * Replication and failover: Redis replicates asynchronously, so by default a failover (Sentinel
      promoting a replica) loses the writes the old primary acknowledged in the last moments before it
      died, those that had not reached the promoted replica yet. With ``replicas=N`` no acknowledged
      write is lost as long as one of the N replicas that confirmed it is the one promoted (Sentinel
      promotes the replica with the most data); the cost is one replication round trip per write, and
      writes fail (``StoreUnavailable``) whenever fewer than N replicas are connected, for example after
      a failover until the old primary is back as a replica.
    * Expiry: the caller's clock decides (the record stores ``expires``); Redis TTLs remove abandoned
      sessions ``DEFAULTS["reap_margin"]`` after their expiry, so ``reap`` finds little. ``reap``,
      ``count`` and ``sids`` walk the keys with SCAN (never KEYS), in batches.
    * Faults: a refused or broken connection, a timeout, a failover in progress (READONLY, LOADING,
      MASTERDOWN, CLUSTERDOWN, TRYAGAIN), a server out of memory (OOM), a cluster whose slots are not
      all served or that keeps redirecting (MOVED/ASK more often than redis-py follows) raise
      ``StoreUnavailable`` naming the server (on a cluster: and the node), a ContainerError. Each write
      is one script, applied whole or not at all; after a timeout or a broken connection it is unknown
      which, so no call is retried by itself (a retried rotation or creation could report a failure for
      what succeeded). A cluster client still follows MOVED and ASK redirections and retries TRYAGAIN
      for a moment (the node that answers with one has run nothing): while resharding moves a
      session's slot, a read follows the session, but a script naming a key that is on neither side
      yet (its lock, a new id) gets TRYAGAIN until the move ends, then ``StoreUnavailable``.
    * Processes and threads: the redis-py client and its connection pool are thread-safe; the container
      makes a new client when it finds itself in another process (after ``fork()``), so no connection is
      ever shared by parent and child. A client passed in is left to the parent; the child gets a new
      one with the same settings (for a Sentinel client: the same Sentinels, service and options).
      Pickles as its URL, or as the settings of the client passed in.
    * Redis Cluster: every key of a session is ``PREFIX{TAG}sid``, TAG being the id's first 4
      characters, and ``new_id`` keeps TAG when ``Session.regenerate`` rotates a session, so every
      script (a rotation and the delete of a tombstone included) names keys of one slot and runs on one
      node, atomically, as on a single server. ``count``, ``sids`` and ``reap`` SCAN every primary.
      ``replicas`` is not available on a cluster.

    Run Redis with ``maxmemory-policy noeviction``: every session key has a TTL, so a ``volatile-*``
    or ``allkeys-*`` policy would evict live sessions under memory pressure; with ``noeviction`` a full
    server refuses writes (``StoreUnavailable``) and keeps every session. For durability against a
    server crash, ``appendonly yes`` (``appendfsync always`` keeps every acknowledged write).
    Needs ``pip install redis`` (imported only when this container is made).
    """

    def __init__(self, client_or_url, prefix=None, lease=None, replicas=None):
        self._redis = _require("redis", "redis")
        import hashlib
        import redis.exceptions
        self._errors = redis.exceptions
        # Raised by redis-py's cluster client (a Redis Cluster it cannot reach or whose slots are not
        # all served), and not a RedisError: caught beside it.
        self._failures = (redis.exceptions.RedisError,
                          getattr(redis.exceptions, "RedisClusterException", redis.exceptions.RedisError))
        self._client_obj = None
        self.url = None
        options = {}
        if isinstance(client_or_url, str):
            self.url, options = self._split_url(client_or_url)
            self.cluster = options.get("cluster", "").lower() in ("1", "yes", "true", "on")
        else:
            self._client_obj = client_or_url
            self.cluster = _is_redis_cluster(client_or_url)
        self.prefix = str(options.get("prefix", "sesskit:") if prefix is None else prefix)
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"a Redis key prefix must not contain braces (they would make it the hash "
                             f"tag of every key): {self.prefix!r}")
        self.lease = float(options.get("lease", DEFAULTS["redis_lease"]) if lease is None else lease)
        if not self.lease > 0:
            raise ValueError("lease must be a positive number of seconds")
        self.replicas = int(options.get("replicas", 0) if replicas is None else replicas)
        if self.replicas < 0:
            raise ValueError("replicas must be 0 or more")
        if self.replicas and self.cluster:     # its pipeline refuses EVALSHA, and WAIT is per node
            raise ValueError("replicas is not available on a Redis Cluster")
        self._margin = DEFAULTS["reap_margin"]
        self._shas = {name: hashlib.sha1((_REDIS_CHECKS + src).encode()).hexdigest()
                      for name, src in _REDIS_SCRIPTS.items()}
        self._pid = None
        self._client_ = None
        self._mutex = _thread.allocate_lock()
        self._reap_cursor = 0
        self.last_reap_visited = 0
        # A cluster URL is named without making its client: that one connects as it is made, and a
        # store is opened when an application starts, which must not fail while Redis is away.
        self.server = self._describe_cluster_url() if self.cluster and self.url is not None \
            else self._describe(self._client())

    @staticmethod
    def _split_url(url):
        """Take this container's options (prefix, lease, replicas, cluster) out of a URL's query
        string."""
        from urllib.parse import parse_qsl, urlencode
        if url.partition(":")[0].lower() not in ("redis", "rediss", "unix", "redis+sentinel"):
            raise ContainerError(f"not a Redis URL: {url!r} (redis://, rediss://, unix:// or "
                                 f"redis+sentinel://)")
        base, _, query_text = url.partition("?")
        query, ours = [], {}
        for name, value in parse_qsl(query_text, keep_blank_values=True):
            if name in ("prefix", "lease", "replicas", "cluster"):
                ours[name] = value
            else:
                query.append((name, value))
        return base + ("?" + urlencode(query) if query else ""), ours

    def __reduce__(self):
        if self.url is None:
            client = self._client()
            if self.cluster:
                nodes = [(node.host, node.port) for node in client.get_nodes()]
                return (_redis_cluster_from, (nodes, _cluster_kwargs(client), client.retry, self.prefix,
                                              self.lease))
            return (_redis_from_settings, (_redis_settings(client), self.prefix, self.lease,
                                           self.replicas))
        query = f"prefix={__import__('urllib.parse').parse.quote(self.prefix)}&lease={self.lease!r}"
        if self.cluster:
            query += "&cluster=1"
        if self.replicas:
            query += f"&replicas={self.replicas}"
        return (RedisContainer, (self.url + ("&" if "?" in self.url else "?") + query,))

    def __repr__(self):
        return f"RedisContainer({self.server!r}, prefix={self.prefix!r})"

    # -- connection --------------------------------------------------------------

    def _client(self):
        client = self._client_
        if client is not None and self._pid == os.getpid():
            return client
        with self._mutex:
            if self._client_ is None or self._pid != os.getpid():
                self._client_ = self._connect()
                self._pid = os.getpid()
            return self._client_

    def _connect(self):
        redis = self._redis
        if self.url is not None:
            from urllib.parse import parse_qs, urlsplit
            given = parse_qs(urlsplit(self.url).query)
            kwargs = {name: DEFAULTS["redis_socket_timeout"]
                      for name in ("socket_timeout", "socket_connect_timeout") if name not in given}
            try:
                import redis.backoff
                import redis.retry
                kwargs["retry"] = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
            except (ImportError, AttributeError):   # pragma: no cover - redis-py without Retry
                pass
            try:
                if self.cluster:
                    # Made here, in the process that uses it; it connects to the cluster at once.
                    import redis.cluster
                    return redis.cluster.RedisCluster.from_url(self.url, **kwargs)
                if self.url.lower().startswith("redis+sentinel:"):
                    return _redis_sentinel_client(self.url, kwargs)
                return redis.Redis.from_url(self.url, **kwargs)
            except ValueError as exc:
                raise ContainerError(f"bad Redis URL {self.url!r}: {exc}") from exc
            except self._failures as exc:
                raise self._fault(exc) from exc
        client = self._client_obj
        if self._pid is not None and self._pid != os.getpid():
            # The caller's client was made in the parent: a new one with the same settings.
            if self.cluster:
                import redis.cluster
                try:
                    client = redis.cluster.RedisCluster(
                        startup_nodes=[redis.cluster.ClusterNode(node.host, node.port)
                                       for node in client.get_nodes()],
                        retry=client.retry, **_cluster_kwargs(client))
                except self._failures as exc:
                    raise self._fault(exc) from exc
            else:
                client = _redis_from_settings(_redis_settings(client))
            self._client_obj = client
        return client

    def _describe_cluster_url(self):
        from redis.connection import parse_url
        try:
            parts = parse_url(self.url)
        except ValueError as exc:
            raise ContainerError(f"bad Redis URL {self.url!r}: {exc}") from exc
        if parts.get("path") or parts.get("db", 0) != 0:
            raise ContainerError(f"bad Redis URL {self.url!r}: a Redis Cluster is reached over TCP and "
                                 f"has database 0 only")
        return f"redis cluster {parts.get('host', 'localhost')}:{parts.get('port', 6379)}"

    @staticmethod
    def _describe(client):
        if _is_redis_cluster(client):
            node = client.get_default_node()
            return f"redis cluster {node.host}:{node.port}" if node else "redis cluster"
        pool = getattr(client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", {})
        manager = getattr(pool, "sentinel_manager", None)
        if manager is not None:
            nodes = ",".join(f"{host}:{port}" for host, port in _redis_sentinel_nodes(manager))
            return f"redis sentinel {pool.service_name} via {nodes} db {kwargs.get('db', 0)}"
        if kwargs.get("path"):
            return f"redis unix:{kwargs['path']} db {kwargs.get('db', 0)}"
        return f"redis {kwargs.get('host', '?')}:{kwargs.get('port', '?')} db {kwargs.get('db', 0)}"

    def close(self):
        """Disconnect this process's connections (the container reconnects on demand)."""
        with self._mutex:
            client, self._client_ = self._client_, None
        if client is not None and self._pid == os.getpid() and self._client_obj is None:
            if self.cluster:
                client.close()
            else:
                client.connection_pool.disconnect()
                for sentinel in getattr(getattr(client.connection_pool, "sentinel_manager", None),
                                        "sentinels", ()):
                    sentinel.connection_pool.disconnect()

    def _fault(self, exc):
        errors = self._errors
        text = str(exc)
        name = type(exc).__name__
        code = _REDIS_CODES.get(name)          # redis-py drops the reply's code from the message
        # By class where redis-py has one (its message lacks the code: MasterDownError's says "Link
        # with MASTER is down"), else by the code that a script's error reply still carries.
        unavailable = isinstance(exc, (errors.ConnectionError, errors.TimeoutError)) or code is not None \
            or (isinstance(exc, errors.ResponseError)
                and any(word in text for word in ("READONLY", "LOADING", "OOM", "MASTERDOWN", "BUSY",
                                                  "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS"))) \
            or (self.cluster and isinstance(exc, self._failures[1])
                and any(words in text for words in ("cannot be connected", "not covered")))
        cls = StoreUnavailable if unavailable else ContainerError
        where = self._where()
        node = getattr(exc, "connection", None)   # the cluster node that failed, set by redis-py
        if self.cluster and getattr(node, "host", None) is not None:
            where += f" (node {node.host}:{node.port})"
        return cls(f"{where}: {name}{f' ({code})' if code else ''}: {text}")

    def _where(self):
        """The server, and with Sentinel the primary it last named."""
        address = getattr(getattr(self._client_, "connection_pool", None), "master_address", None)
        return f"{self.server} (primary {address[0]}:{address[1]})" if address else self.server

    def _run(self, name, keys, args):
        """Run one of _REDIS_SCRIPTS: EVALSHA, then EVAL when the server does not have it yet. On a
        cluster both go to the node serving the keys' slot (redis-py routes them by their keys), so
        each node is sent the script once."""
        try:
            client = self._client()
            if self.replicas and name in _REDIS_WRITES:
                return self._run_waiting(client, name, keys, args)
            try:
                return client.evalsha(self._shas[name], len(keys), *keys, *args)
            except self._errors.NoScriptError:
                return client.eval(_REDIS_CHECKS + _REDIS_SCRIPTS[name], len(keys), *keys, *args)
        except self._failures as exc:
            raise self._fault(exc) from exc

    def _run_waiting(self, client, name, keys, args):
        """Run a write script, then WAIT for ``self.replicas`` replicas, in one round trip on one
        connection (a pipeline): WAIT counts the replicas that have that connection's writes."""
        timeout = DEFAULTS["redis_wait_timeout"]
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout:
            timeout = min(timeout, socket_timeout / 2)
        wait_ms = max(int(timeout * 1000), 1)           # WAIT n 0 would wait for ever
        for attempt in ("evalsha", "eval"):
            pipe = client.pipeline(transaction=False)
            if attempt == "evalsha":
                pipe.evalsha(self._shas[name], len(keys), *keys, *args)
            else:
                pipe.eval(_REDIS_CHECKS + _REDIS_SCRIPTS[name], len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.replicas, wait_ms)
            result, confirmed = pipe.execute(raise_on_error=False)
            if not (attempt == "evalsha" and isinstance(result, self._errors.NoScriptError)):
                break
        if isinstance(result, Exception):
            raise result
        if result == 1:                                   # it wrote: the replicas must have it
            if isinstance(confirmed, Exception):
                raise confirmed
            if confirmed < self.replicas:
                raise StoreUnavailable(
                    f"{self._where()}: only {confirmed} of {self.replicas} replicas confirmed the "
                    f"write ({name}) within {wait_ms / 1000:g} s (WAIT): it is applied on the primary "
                    f"and may yet reach them, or be lost if the primary fails over now; its outcome is "
                    f"unknown")
        return result

    def _call(self, method, *args, **kwargs):
        try:
            return getattr(self._client(), method)(*args, **kwargs)
        except self._failures as exc:
            raise self._fault(exc) from exc

    def _keys(self, sid):
        key = f"{self.prefix}{{{sid[:_REDIS_TAG]}}}{sid}"
        return key, key + ":lock"

    def new_id(self, previous):
        """A fresh id that keeps ``previous``'s hash tag (its first 4 characters), so a rotation
        writes one slot; 120 of its random bits are new (see "Session ids")."""
        return _rotated_session_id(previous, _REDIS_TAG)

    def _ttl_ms(self, expires, now):
        return max(int((expires - now + self._margin) * 1000), 1000)

    @staticmethod
    def _token(held):
        return "" if held is None else held.token or "released"

    def _fenced(self, result, sid):
        if result == -1:
            raise LockLost(f"the lock of session {_short(sid)} was lost: its lease of {self.lease:g} s ran "
                           f"out (the process was paused or cut off from {self.server} that long); "
                           f"nothing was written")
        return result

    # -- reading -----------------------------------------------------------------

    def load(self, sid):
        return _redis_record(self._run("load", [self._keys(sid)[0]], []))

    def lock(self, sid, timeout):
        key, lock_key = self._keys(sid)
        token = os.urandom(16).hex()
        lease_ms = int(self.lease * 1000)
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        delay = 0.0005
        while True:
            got = self._run("lock", [key, lock_key], [token, lease_ms])
            if got == -1:
                return None
            if got == 1:
                handle = _RedisLock(self, sid, lock_key, token)
                _lease_keeper.add(handle)
                return handle
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    if timeout <= 0:
                        raise LockTimeout(f"session {_short(sid)} is locked by another request "
                                          f"(not waiting)")
                    raise LockTimeout(f"session {_short(sid)} is still locked after {timeout:g} s; the "
                                      f"request holding it is slow or stuck (raise lock_timeout, or use "
                                      f"lock='merge')")
                time.sleep(min(delay, left))
            else:
                time.sleep(delay)
            delay = min(delay * 2, DEFAULTS["poll_interval"])

    def _scan(self):
        """Yield batches of session sids with SCAN (never KEYS), resuming from nothing."""
        cursor = 0
        while True:
            cursor, batch = self._scan_batch(cursor)
            if batch:
                yield batch
            if cursor == 0:
                return

    def _scan_batch(self, cursor):
        """One SCAN step of about 500 keys: (next cursor, the sids found). A cursor is 0 at the start
        and at the end of a walk. On a cluster it is (node name, that node's cursor): the walk SCANs
        every primary in turn, in name order; a primary that is gone by the next step (a failover)
        is passed over, as SCAN may miss what moves while it runs."""
        # Session hashes only: PREFIX{TAG}sid with its exact lengths, so lock keys do not match.
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self.prefix) \
            + "{" + "?" * _REDIS_TAG + "}" + "?" * SID_LENGTH
        start = len(self.prefix.encode("utf-8")) + _REDIS_TAG + 2
        if not self.cluster:
            cursor, keys = self._call("scan", cursor, pattern, 500)
            return int(cursor), [key[start:].decode("ascii") for key in keys]
        primaries = {node.name: node for node in self._call("get_primaries")}
        names = sorted(primaries)
        name, at = cursor or (names[0] if names else "", 0)
        if name not in primaries:
            later = [other for other in names if other > name]
            if not later:
                return 0, []
            name, at = later[0], 0
        cursors, keys = self._call("scan", at, pattern, 500, target_nodes=primaries[name])
        at = int(cursors[name])
        if at == 0:
            later = [other for other in names if other > name]
            cursor = (later[0], 0) if later else 0
        else:
            cursor = (name, at)
        return cursor, [key[start:].decode("ascii") for key in keys]

    def _expiries(self, sids):
        pipe = self._client().pipeline(transaction=False)
        for sid in sids:
            pipe.hget(self._keys(sid)[0], "e")
        try:
            values = pipe.execute()
        except self._failures as exc:
            raise self._fault(exc) from exc
        expiries = []
        for sid, value in zip(sids, values):
            try:
                expiries.append((sid, float(value)))
            except (TypeError, ValueError):      # no expiry, or a damaged one: no session (its TTL ends it)
                pass
        return expiries

    def sids(self, now=None):
        now = time.time() if now is None else now
        return [sid for batch in self._scan() for sid, expires in self._expiries(batch)
                if expires >= now and is_valid_session_id(sid)]

    # -- writing -----------------------------------------------------------------

    def _create_args(self, record, ttl_ms):
        fields, seq = _redis_fields(record.data)
        return [ttl_ms, "c", repr(float(record.created)), "e", repr(float(record.expires)),
                "t", repr(float(record.timeout)), "m", repr(float(record.max_age)),
                "f", record.forward or "", "n", seq] + fields

    def create(self, sid, record):
        ttl_ms = self._ttl_ms(record.expires, record.created)
        if not self._run("create", [self._keys(sid)[0]], self._create_args(record, ttl_ms)):
            raise ContainerError(f"session {_short(sid)} exists already")

    def update(self, sid, changed, deleted, meta, now, held=None, base=None):
        key, lock_key = self._keys(sid)
        args = [repr(float(now)), self._token(held), self._ttl_ms(meta.expires, now),
                repr(float(meta.created)), repr(float(meta.expires)), repr(float(meta.timeout)),
                repr(float(meta.max_age)), meta.forward or ""]
        result = self._run("update", [key, lock_key], args + _redis_changes(changed, deleted))
        return self._fenced(result, sid) == 1

    def rotate(self, old, new, changed, deleted, meta, tombstone, now, held=None, base=None):
        if new[:_REDIS_TAG] != old[:_REDIS_TAG]:
            # Refused on a single server too, so that what works in development works on a cluster.
            raise ContainerError(f"cannot rotate session {_short(old)} to {_short(new)}: the ids of one "
                                 f"session must share their Redis hash tag; make the new id with "
                                 f"new_id(old)")
        key, lock_key = self._keys(old)
        args = [repr(float(now)), self._token(held), self._ttl_ms(meta.expires, now),
                repr(float(meta.created)), repr(float(meta.expires)), repr(float(meta.timeout)),
                repr(float(meta.max_age))]
        if tombstone is None:
            args += ["", "", "", "", "", ""]
        else:
            args += [self._ttl_ms(tombstone.expires, now), repr(float(tombstone.created)),
                     repr(float(tombstone.expires)), repr(float(tombstone.timeout)),
                     repr(float(tombstone.max_age)), tombstone.forward]
        result = self._run("rotate", [key, lock_key, self._keys(new)[0]],
                           args + _redis_changes(changed, deleted))
        if result == -2:
            raise ContainerError(f"session {_short(new)} exists already")
        return self._fenced(result, old) == 1

    def touch(self, sid, expires, timeout=None, now=None, held=None):
        key, lock_key = self._keys(sid)
        args = [repr(float(expires)), "" if timeout is None else repr(float(timeout)),
                "" if now is None else repr(float(now)), self._token(held),
                self._ttl_ms(expires, expires if now is None else now)]
        return self._fenced(self._run("touch", [key, lock_key], args), sid) == 1

    def delete(self, sid, held=None):
        key, lock_key = self._keys(sid)
        handle = held or self.lock(sid, DEFAULTS["lock_timeout"])
        if handle is None:
            return                                    # not stored
        try:
            # A tombstone goes with the session it forwards to (the Container contract). The forward is
            # read first so that the script can name that session's key (Redis Cluster wants every
            # key declared, in one slot: a forward made by rotate() shares the tag); the script checks
            # it is still the same, else it is read again. A damaged forward names no session.
            for _ in range(8):
                record = self.load(sid)
                forward = "" if record is None or record.forward is None else record.forward
                target = is_valid_session_id(forward) and forward[:_REDIS_TAG] == sid[:_REDIS_TAG]
                keys = [key, lock_key] + ([self._keys(forward)[0]] if target else [])
                result = self._run("delete", keys, [self._token(handle), forward])
                if result != 0:
                    break
            self._fenced(result, sid)
        finally:
            if held is None:
                handle.release()

    # -- expiry ------------------------------------------------------------------

    def reap(self, now=None, budget=None, interval=0.0):
        """Remove sessions expired at ``now`` that Redis has not dropped yet (those within
        ``DEFAULTS["reap_margin"]`` of their expiry): SCAN in batches of about 500 keys, one pipelined
        script per candidate that deletes it only if it is still expired and not locked (in use).

        One reaper per store at a time (the key ``PREFIX reap.lock``, set with NX and a lease; the
        others return 0); ``PREFIX last_reap`` holds when the last reap started, for ``interval``. With
        ``budget`` seconds the walk stops after the batch that crossed it, and this container's next
        reap resumes from the SCAN cursor it reached. ``last_reap_visited`` counts the candidates.
        """
        now = time.time() if now is None else now
        reaper_key, last_key = f"{self.prefix}reap.lock", f"{self.prefix}last_reap"
        token = os.urandom(16).hex()
        if not self._call("set", reaper_key, token, px=int(max(self.lease, 60) * 1000), nx=True):
            return 0
        removed = visited = 0
        try:
            if interval:
                last = self._call("get", last_key)
                if last is not None and now - float(last) < interval:
                    return 0
            self._call("set", last_key, repr(float(now)))
            deadline = None if budget is None else time.monotonic() + budget
            cursor = self._reap_cursor
            while True:
                cursor, sids = self._scan_batch(cursor)
                candidates = [sid for sid, expires in self._expiries(sids) if expires < now]
                visited += len(candidates)
                if candidates:
                    removed += self._reap_batch(candidates, now)
                self._reap_cursor = cursor
                if cursor == 0 or (deadline is not None and time.monotonic() > deadline):
                    return removed
        finally:
            self.last_reap_visited = visited
            self._run("lease", [reaper_key], [token, ""])

    def _reap_batch(self, sids, now):
        """Run the "reap" script for each of ``sids``; the number removed. The first runs alone, with
        EVALSHA's fallback, so that the server has the script, the others in one pipeline; one that
        finds no script anyway runs again alone. redis-py's cluster pipeline refuses EVALSHA, so on a
        cluster each runs alone (there are few: Redis' TTLs remove all but the last margin's)."""
        removed = self._run("reap", list(self._keys(sids[0])), [repr(float(now))])
        if self.cluster:
            return removed + sum(self._run("reap", list(self._keys(sid)), [repr(float(now))])
                                 for sid in sids[1:])
        if len(sids) == 1:
            return removed
        pipe = self._client().pipeline(transaction=False)
        for sid in sids[1:]:
            pipe.evalsha(self._shas["reap"], 2, *self._keys(sid), repr(float(now)))
        try:
            results = pipe.execute(raise_on_error=False)
        except self._failures as exc:
            raise self._fault(exc) from exc
        for sid, result in zip(sids[1:], results):
            if isinstance(result, self._errors.NoScriptError):
                result = self._run("reap", list(self._keys(sid)), [repr(float(now))])
            elif isinstance(result, Exception):
                raise self._fault(result) from result
            removed += result
        return removed


def _redis_sentinel_nodes(manager):
    """The (host, port) of each Sentinel a ``redis.sentinel.Sentinel`` asks."""
    return [(node.connection_pool.connection_kwargs.get("host"),
             node.connection_pool.connection_kwargs.get("port")) for node in manager.sentinels]


def _redis_sentinel_client(url, defaults):
    """The client of a ``redis+sentinel://`` URL (see RedisContainer)."""
    from urllib.parse import unquote, urlsplit
    import redis.connection
    import redis.sentinel
    parts = urlsplit(url)
    service = unquote(parts.path.strip("/"))
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for node in filter(None, hosts.split(",")):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a Sentinel is host:port, not {node!r}")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes or not service or "/" in service:
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/service")
    # redis-py's own URL parser turns the query's options into typed keyword arguments.
    options = redis.connection.parse_url(f"redis://{userinfo + '@' if userinfo else ''}localhost/"
                                         f"?{parts.query}")
    options.pop("host", None)
    sentinel_password = options.pop("sentinel_password", None)
    options = {**defaults, **options}
    sentinel_kwargs = {name: value for name, value in options.items()
                       if name.startswith("socket_") or name == "retry"}
    if sentinel_password is not None:
        sentinel_kwargs["password"] = sentinel_password
    manager = redis.sentinel.Sentinel(nodes, sentinel_kwargs=sentinel_kwargs)
    return manager.master_for(service, **options)


#: What redis-py's pools add to their connection arguments for themselves (a Sentinel pool's proxy;
#: 8.x: a registry, a notifications handler holding locks, the original address and timeouts): a new
#: pool makes its own, so a copy for a forked child or a pickle leaves them out.
_REDIS_POOL_MADE = frozenset(("connection_pool", "himport_registry", "maint_notifications_pool_handler",
                              "orig_host_address", "orig_socket_timeout", "orig_socket_connect_timeout"))


def _redis_settings(client):
    """What makes a client like ``client``, without its connections (picklable): a plain pool's class
    and keyword arguments, or a Sentinel client's Sentinels, service and options."""
    import redis.utils
    unset = getattr(redis.utils, "SENTINEL", None)   # "not given": unpickled it would be a new object
    pool = client.connection_pool
    kwargs = {name: value for name, value in pool.connection_kwargs.items()
              if name not in _REDIS_POOL_MADE and (unset is None or value is not unset)}
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None:
        return ("pool", type(pool), pool.connection_class, kwargs)
    return ("sentinel", type(manager), _redis_sentinel_nodes(manager), manager.sentinel_kwargs,
            manager.min_other_sentinels, getattr(manager, "_force_master_ip", None), pool.service_name,
            type(pool), pool.connection_class, pool.check_connection, kwargs)


def _redis_from_settings(settings, prefix=None, lease=None, replicas=None):
    """A new client from _redis_settings(); with a prefix (unpickling), a RedisContainer on it."""
    redis = _require("redis", "redis")
    if settings[0] == "pool":
        _, pool_class, connection_class, kwargs = settings
        client = redis.Redis(connection_pool=pool_class(connection_class=connection_class, **kwargs))
    else:
        (_, manager_class, nodes, sentinel_kwargs, min_others, force_ip, service, pool_class,
         connection_class, check, kwargs) = settings
        manager = manager_class(nodes, min_other_sentinels=min_others, sentinel_kwargs=sentinel_kwargs,
                                **({"force_master_ip": force_ip} if force_ip else {}))
        client = manager.master_for(service, connection_pool_class=pool_class,
                                    connection_class=connection_class, check_connection=check, **kwargs)
    return client if prefix is None else RedisContainer(client, prefix, lease, replicas)


def _is_redis_cluster(client):
    """Whether ``client`` is redis-py's Redis Cluster client (then redis.cluster is imported)."""
    cluster = sys.modules.get("redis.cluster")
    return cluster is not None and isinstance(client, cluster.RedisCluster)


def _cluster_kwargs(client):
    """The connection settings a RedisCluster client was made with, for a new one made like it."""
    kwargs = {name: value for name, value in client.nodes_manager.connection_kwargs.items()
              if name not in ("redis_connect_func", "oss_cluster_maint_notifications_handler")}
    if getattr(client, "user_on_connect_func", None) is not None:
        kwargs["redis_connect_func"] = client.user_on_connect_func
    return kwargs


def _redis_cluster_from(nodes, kwargs, retry, prefix, lease):
    """Unpickle a RedisContainer that was made from a RedisCluster client: a new one like it."""
    _require("redis", "redis")
    import redis.cluster
    client = redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in nodes], retry=retry,
        **kwargs)
    return RedisContainer(client, prefix, lease)


# Store URLs ------------------------------------------------------------------------

#: URL scheme -> container class name (resolved when used, so later sections can add schemes).
_SCHEMES = {
    "memory": "MemoryContainer",
    "file": "FileContainer",
    "sqlite": "SQLiteContainer",
    "lmdb": "LMDBContainer",
    "redis": "RedisContainer",
    "rediss": "RedisContainer",
    "unix": "RedisContainer",
    "redis+sentinel": "RedisContainer",
}


def open_store(store, **options):
    """Return a container for ``store``: a Container (returned as is) or a URL.

    URLs: ``file:/path/to/dir``, ``sqlite:/path/to/file.db``, ``lmdb:/path/to/dir``, ``memory:``,
    ``redis://host:port/db`` (also ``rediss://``, ``unix:///path/to/socket`` and, through Redis
    Sentinel, ``redis+sentinel://host:port[,host:port...]/service?db=0``: see RedisContainer), and
    for a Redis Cluster ``redis://host:port?cluster=1`` naming any one of its nodes (or
    ``rediss://``); ``options`` go to the container class.
    Raises ContainerError for an unknown scheme or an unusable store.
    """
    if isinstance(store, Container):
        return store
    if not isinstance(store, str) or ":" not in store:
        raise ContainerError(f"not a store URL: {store!r} (expected one of "
                             f"{', '.join(s + ':...' for s in _SCHEMES)})")
    scheme, _, rest = store.partition(":")
    cls_name = _SCHEMES.get(scheme.lower())
    if cls_name is None:
        raise ContainerError(f"unknown store scheme {scheme!r} in {store!r} (known: {', '.join(_SCHEMES)})")
    cls = globals()[cls_name]
    if cls is MemoryContainer:
        return cls(**options)
    if cls is RedisContainer:                         # a whole URL, as redis-py reads it
        return cls(store, **options)
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise ContainerError(f"store URL {store!r} names no path")
    try:
        return cls(rest, **options)
    except PermissionError as exc:
        user = _process_user()
        raise ContainerError(
            f"cannot create or open the session store {rest!r} as user {user}: {exc.strerror} "
            f"({exc.filename or rest}); create it for that user first, for example "
            f"install -d -m 0700 -o {user} {rest}") from exc


def _user_name(uid):
    """The name of user ``uid`` (the uid itself when it has none)."""
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _process_user():
    """The name of the user this process runs as."""
    if os.name != "posix":      # pragma: no cover
        return os.environ.get("USERNAME", "?")
    return _user_name(os.geteuid())


_default_stores = {}


def _default_store():
    """The embedded default: ``$SESSKIT_STORE`` if set, else a per-user directory in the temp dir."""
    url = os.environ.get("SESSKIT_STORE")
    if not url:
        if os.name == "nt":  # pragma: no cover
            import tempfile
            url = f"file:{os.path.join(tempfile.gettempdir(), 'sesskit-' + os.environ.get('USERNAME', 'user'))}"
        else:   # tempfile costs milliseconds to import; CGI pays imports on every request
            url = f"file:{os.path.join(os.environ.get('TMPDIR') or '/tmp', f'sesskit-{os.geteuid()}')}"
    key = (url, os.getpid())
    container = _default_stores.get(key)
    if container is None:
        container = _default_stores[key] = open_store(url)
    return container


###############################################################################
# Session & open_session ######################################################
###############################################################################


_UNLOADED, _OPEN, _CLOSED = "unloaded", "open", "closed"      # Session._state


class Session(MutableMapping):
    """A session: a dict of JSON values with a lifecycle of load, any number of saves, and close.

    Made by ``open_session``; see there for the lock modes. Use it as a ``with`` block (enter loads,
    a clean exit saves and closes, an exception discards the block's changes), or in two steps for code
    that cannot wrap a request in a block: ``load()`` now, then ``close()`` (save and end) or
    ``close(discard=True)`` later, with ``save()`` in between as often as needed. Every write-back
    applies only what this session changed, with the guarantees of its lock mode.

    Attributes: ``id`` (the id the client must be given: it changes on ``regenerate``, ``delete``, and
    when a write-back followed a rotation made by another request), ``is_new``, ``created``, ``accessed``
    and ``expires`` (epoch seconds), ``timeout`` (settable: the new sliding timeout is stored with the
    session), ``mode``; ``saved`` (whether a write-back stored something), ``lost`` (True when a
    write-back found the session deleted, expired or rotated away by another request and so dropped its
    changes), ``deleted`` (``delete()`` ran) and ``stale`` (the incoming id was rotated away and its
    grace period is over: the session is empty, nothing it does is stored, and the client is sent no
    cookie, so its newer cookie survives).

    The lifecycle lives here once. Ids: the id a client sent is resolved in ``_resolve`` (the only place
    a rotated id's forward is followed), the id the session is stored under is ``_stored``, and it
    changes only in ``_write_back``. Containers decide under their lock or in one transaction whether a
    record may still be written (``Record.writable``).

    A Session belongs to one thread; it can be loaded once.
    """

    def __init__(self, sid, container, *, timeout, max_age, lock, lock_timeout, clock, max_size,
                 reap_interval, codec=None):
        if lock not in LOCK_MODES:
            raise ValueError(f"lock must be one of {', '.join(LOCK_MODES)}, not {lock!r}")
        if codec not in (None, "json", "tagged"):
            raise ValueError(f"codec must be 'json' or 'tagged', not {codec!r}")
        if codec == "tagged":
            self._tagged = True
            self._decoded = {}        # key -> the value as the caller sees it
        self._incoming = sid          # what the client sent (maybe not an id at all)
        self.container = container
        self.mode = lock
        self._default_timeout = float(timeout)
        self._max_age = self._default_max_age = float(max_age or 0)
        self._lock_timeout = lock_timeout
        self._clock = clock
        self._max_size = max_size
        self._reap_interval = reap_interval
        self._state = _UNLOADED
        self._stored = None           # the id the session's record is stored under; None: not stored
        self.id = None
        self.is_new = True

    # State that most sessions never change lives on the class, and an instance gets its own only when
    # it changes: CPython keeps the attributes of instances in a compact shared layout only up to 30
    # names per class, and past that each Session's attribute reads and writes were a measurable part
    # of a request (issue 8).
    _tagged = False                   # the tagged codec; then _decoded: key -> value as the caller sees it
    _decoded = None
    _data = None
    _held = None                      # the held lock (exclusive mode) and the id it locks
    _held_sid = None
    _grace = None                     # a pending regenerate(): the grace period of the old id
    _forwarded = False                # reached through a rotated id's forward: may not rotate again
    saved = False
    lost = False
    deleted = False
    stale = False
    _touched = False                  # a touch moved the expiry (the cookie's Max-Age follows it)

    # -- mapping -----------------------------------------------------------------

    def _live(self):
        if self._data is None:
            raise SesskitError("use the session between load() and close() (inside its 'with' block)")
        return self._data

    def __getitem__(self, key):
        value = self._live()[key]
        if not self._tagged:
            return value
        decoded = self._decoded.get(key, _MISSING)
        if decoded is _MISSING:
            decoded = _untag(value)
            if decoded is not value:
                self._decoded[key] = decoded
        return decoded

    def __setitem__(self, key, value):
        data = self._live()
        if self.mode == "read":
            raise ReadOnlySession(f"session {_short(self.id)} was opened with lock='read'")
        if type(key) is not str:
            raise TypeError(f"session keys must be str, not {type(key).__name__}: {key!r}")
        if self._tagged:
            try:
                tagged = _tag(value)
            except RecursionError:                # deeper than the stack: say why, as json would
                problem = _nesting_problem(value, DEFAULTS["max_depth"]) or "the value nests too deep"
                raise TypeError(f"session key {key!r}: {problem}") from None
            self._decoded.pop(key, None)
            if tagged is not value:
                self._decoded[key] = value
            value = tagged
        _check_json(key, value)
        data[key] = value

    def __delitem__(self, key):
        data = self._live()
        if self.mode == "read":
            raise ReadOnlySession(f"session {_short(self.id)} was opened with lock='read'")
        del data[key]
        if self._tagged:
            self._decoded.pop(key, None)

    def _retag(self):
        """Tagged codec: encode again the values handed out decoded (the caller may have edited them
        in place), so that the write-back compares and stores what they are now."""
        data = self._data
        for key, value in self._decoded.items():
            if key in data:
                data[key] = _tag(value)

    def __iter__(self):
        return iter(self._live())

    def __len__(self):
        return len(self._live())

    def __contains__(self, key):
        return key in self._live()

    def __repr__(self):
        return f"<sesskit.Session {_short(self.id)} mode={self.mode} new={self.is_new}>"

    # -- metadata ----------------------------------------------------------------

    @property
    def timeout(self):
        return self._timeout

    @timeout.setter
    def timeout(self, seconds):
        if self.mode == "read":
            raise ReadOnlySession("cannot change the timeout of a read-only session")
        seconds = float(seconds)
        if not seconds > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self._timeout = seconds

    @property
    def accessed(self):
        """When the session was last used, as far as recorded (to within the touch interval)."""
        return min(self.expires - self._stored_timeout, self._clock())

    def _expiry(self, now):
        return _expiry(self.created, self._timeout, self._max_age, now)

    def _meta(self, now):
        return Record(None, self.created, self._expiry(now), self._timeout, self._max_age)

    # -- load --------------------------------------------------------------------

    def load(self):
        """Load the session (in exclusive mode: lock it first), or start a new one; return ``self``.

        An incoming id that is malformed, unknown or expired is never adopted: the session is then new,
        with a new id. An id rotated by ``regenerate(grace=...)`` within its grace period loads the
        session it was rotated to; after it, the session is empty and ``stale``.
        :raises LockTimeout: exclusive mode could not have the lock in time (nothing is held then).
        """
        if self._state is not _UNLOADED:
            raise SesskitError("a Session can be loaded once")
        self._state = _OPEN
        try:
            self._load(self._clock())
        except BaseException:
            self._state = _CLOSED
            self._release()               # a lock taken before the failure must not outlive it
            raise
        return self

    __enter__ = load

    def _load(self, now):
        sid = self._incoming if is_valid_session_id(self._incoming) else None
        record = data = None
        if sid is not None:
            sid, record, how = self._resolve(sid, now, locking=True)
            if how == "forwarded":
                self._forwarded = True
            elif how == "stale":
                self.stale = True
        if record is not None:
            try:
                data = _decode_fast(record.data)
            except ValueError:
                pass                                  # damaged: loads as no session
        if type(data) is not dict:
            self._release()
            self._new(now)
            return
        self.id = self._stored = sid
        self.is_new = False
        self.created, self.expires = record.created, record.expires
        self._timeout = self._stored_timeout = record.timeout
        self._max_age = self._stored_max_age = record.max_age
        self._loaded = record.data
        self._data = data
        self._snapshot = dict(data)

    def _resolve(self, sid, now, locking):
        """Find the live record of the session ``sid`` names: ``(sid, record or None, how)``, ``how``
        being "live", "absent", "forwarded" (``sid`` was rotated and is inside its grace period: the
        returned sid and record are those it forwards to) or "stale" (rotated, grace period over).

        The one place where forwards are followed, and never more than one: a forward to a rotated id
        counts as absent. With ``locking`` in exclusive mode, the returned record's session is locked.
        """
        record = self._fetch(sid, now, locking)
        if record is None or record.forward is None:
            return sid, record, "absent" if record is None else "live"
        if locking:
            self._release()
        if not record.forwards(now):
            return sid, None, "stale"
        sid = record.forward
        record = self._fetch(sid, now, locking)
        if record is not None and record.forward is not None:
            if locking:
                self._release()
            record = None
        return sid, record, "absent" if record is None else "forwarded"

    def _fetch(self, sid, now, locking):
        """Load ``sid`` (locking it first if asked, in exclusive mode); None if absent or expired."""
        if locking and self.mode == "exclusive":
            self._held = self.container.lock(sid, self._lock_timeout)
            if self._held is None:
                return None
            self._held_sid = sid
        record = self.container.load(sid)
        if record is None or record.expires < now:
            return None
        return record

    def _new(self, now):
        self.id, self.is_new = (self._incoming if self.stale else new_session_id()), True
        self._stored = None
        self.created = now
        self._timeout = self._stored_timeout = self._default_timeout
        self._max_age = self._stored_max_age = self._default_max_age
        self.expires = self._expiry(now)
        self._loaded = "{}"
        self._data = {}
        self._snapshot = {}

    def _release(self):
        if self._held is not None:
            held, self._held, self._held_sid = self._held, None, None
            held.release()

    # -- lifecycle operations --------------------------------------------------------

    def delete(self):
        """End the session now (logout): its record is removed at once, under its lock.

        The session goes on empty, under a new id, stored only if something is put into it;
        ``deleted`` stays True so web integrations can expire the cookie. A stale session has nothing
        to delete and no cookie is sent for it.
        """
        self._live()
        if self.mode == "read":
            raise ReadOnlySession("cannot delete a session opened with lock='read'")
        if self._stored is not None:
            self.container.delete(self._stored, held=self._held)
            self._release()
        self.deleted = True
        self._grace = None
        self._new(self._clock())

    def regenerate(self, grace=0.0):
        """Move the session to a new id at write-back, keeping its data (call it after a login).

        The rotation is one atomic step of the container, so no concurrent write-back is lost in it.
        For ``grace`` seconds the old id forwards to the new one: requests already in flight with the
        old cookie load and write the rotated session (and their responses carry the new cookie).
        After the grace period the old id is remembered for the session's timeout: a request that comes
        with it gets an empty ``stale`` session, whose writes are dropped (``lost``) and which sends no
        cookie, so the client keeps its new one. A session reached through a forward cannot be rotated
        again (this call then does nothing and returns False).
        """
        self._live()
        if self.mode == "read":
            raise ReadOnlySession("cannot regenerate a session opened with lock='read'")
        grace = float(grace)
        if not grace >= 0:
            raise ValueError("grace must be zero or a positive number of seconds")
        if self._forwarded:
            return False
        if self._stored is not None:
            self._grace = grace
        self.id = self.container.new_id(self._stored or self.id)
        return True

    def expire_at(self, when):
        """End the session at ``when`` (epoch seconds or a ``datetime``; a naive one is local time),
        however it is used meanwhile: reads never slide its expiry past that time. The end is stored
        with the session at write-back. A time that has passed ends the session now, as ``delete()``.
        ``None`` removes such an end (back to the ``max_age`` the session was opened with).
        """
        self._live()
        if self.mode == "read":
            raise ReadOnlySession("cannot change the expiry of a read-only session")
        if when is None:
            self._max_age = self._default_max_age
            return
        if not isinstance(when, (int, float)):
            when = when.timestamp()
        if when <= self._clock():
            self.delete()
            return
        self._max_age = max(float(when) - self.created, 1e-6)

    # -- write-back ------------------------------------------------------------------

    def save(self):
        """Write back what was done so far, as the end of a block would, and go on as if the session
        had just been loaded (in exclusive mode holding the lock of the id it is now stored under).

        Unlike the end of a block, an explicit save stores a new session even while it is empty.
        """
        self._live()
        self._save(self._clock(), create=True)

    def close(self, discard=False):
        """End the session: write back (unless ``discard``), release every lock, then maybe reap.

        Calling it again does nothing. After it, ``saved``, ``lost``, ``id`` and ``deleted`` tell what
        happened. Raises what the write-back raised (SessionTooLarge, TypeError for a value edited in
        place into something that is not JSON, ContainerError); the stored session is then unchanged.
        """
        if self._state is _CLOSED:
            return
        self._close(self._clock(), discard)

    def _close(self, now, discard):
        was_open = self._state is _OPEN
        try:
            if not discard and was_open:
                if self._tagged:
                    self._retag()
                self._write_back(now)
        finally:
            self._state = _CLOSED
            self._release()
            self._data = None
        if was_open and not discard and self._reap_interval:
            self._maybe_reap()

    def __exit__(self, exc_type, exc, tb):
        if self._state is not _CLOSED:                # close(), without one more call per request
            self._close(self._clock(), exc_type is not None)
        return False

    def _save(self, now, create=False):
        """Write back, then go on as if the block had just loaded what it wrote."""
        if self._tagged:
            self._retag()
        text = _encode_data(self._data)
        wrote = (self._stored is None or self._grace is not None or text != self._loaded
                 or self._timeout != self._stored_timeout or self._max_age != self._stored_max_age)
        self._write_back(now, create)
        moved = self._touched
        if self.lost or self.stale or self._stored is None:
            return
        if self.mode == "exclusive" and self._held_sid != self._stored:
            # a new or rotated session: hold its lock from now on, so that the client's next request,
            # which will name this id, waits for this one
            self._release()
            self._held = self.container.lock(self._stored, self._lock_timeout)
            self._held_sid = self._stored
        if wrote or moved:
            self.expires = self._expiry(now)
        self.is_new = False
        self._loaded = text
        self._snapshot = dict(self._data)
        self._stored_timeout = self._timeout
        self._stored_max_age = self._max_age

    def _too_large(self, size):
        return SessionTooLarge(f"session {_short(self.id)} serialises to {size} bytes, over its "
                               f"max_size of {self._max_size}; nothing was stored")

    def _write_back(self, now, create=False):
        """Store what the session changed: create, update, rotate or touch. Sets ``saved``/``lost``.
        A new session is stored when it holds data, or with ``create`` (an explicit save) when empty."""
        if self._touched:
            self._touched = False
        if self.stale:
            if self._data or self._grace is not None or self._timeout != self._stored_timeout:
                self.lost = True                       # a late request of a rotated id writes nothing
            return
        if self._stored is None:
            if self._data or create:
                text = _encode_data(self._data)
                if len(text) > self._max_size:
                    raise self._too_large(len(text))
                self.container.create(self.id, Record(text, self.created, self._expiry(now),
                                                      self._timeout, self._max_age))
                self._stored, self.saved = self.id, True
            return
        if self.mode == "read":
            changed = deleted = None
        else:
            changed, deleted, size = self._changes()
            # The limit bounds what this block makes of the session; concurrent merges of other keys can
            # push the stored total past it, and then a block that does not grow the session still saves.
            if (changed or deleted or self._grace is not None) and size > self._max_size \
                    and size > len(self._loaded):
                raise self._too_large(size)
        container, base = self.container, (self._loaded, self._data)
        if self._grace is not None:
            tombstone = Record.tombstone(self.id, now, self._grace, self._timeout)
            ok = container.rotate(self._stored, self.id, changed, deleted, self._meta(now), tombstone,
                                  now, held=self._held, base=base)
            if ok:
                self._stored, self._grace = self.id, None
        elif not changed and not deleted and self._timeout == self._stored_timeout \
                and self._max_age == self._stored_max_age:
            new_expiry = self._expiry(now)
            if new_expiry - self.expires >= _touch_interval(self._timeout):
                self._touched = container.touch(self._stored, new_expiry, self._stored_timeout, now,
                                                held=self._held)
            return
        else:
            ok = container.update(self._stored, changed, deleted, self._meta(now), now, held=self._held,
                                  base=base)
        if not ok:
            # Rotated by another request meanwhile: inside its grace period the old id forwards, and
            # the changes go to the session it was rotated to (which the client is then given; it is
            # not rotated again). Otherwise they are dropped and reported.
            sid, record, how = self._resolve(self._stored, now, locking=False)
            if how == "forwarded":
                timeout = self._timeout if self._timeout != self._stored_timeout else record.timeout
                meta = Record(None, record.created, max(record.expires, _expiry(
                    record.created, timeout, record.max_age, now)), timeout, record.max_age)
                ok = container.update(sid, changed or {}, deleted or [], meta, now)
                if ok:
                    self.id, self._stored, self._grace, self._forwarded = sid, sid, None, True
        self.saved, self.lost = ok, not ok

    def _changes(self):
        """Return ``(changed, deleted, size)``: the keys this block set (their JSON differs from what
        was loaded), the keys it deleted, and the size of the data as JSON after those changes.

        ``_snapshot`` is a shallow copy of the loaded dict: a key still bound to the very object it was
        loaded with is unchanged unless that object is a container (list, dict or any other that may
        have been edited in place); only then is a pristine copy decoded again to compare JSON texts. So the cost follows
        the keys changed and the nested values, not the size of the session. Raises TypeError naming
        the key when an in-place edit put something that is not JSON into a value.
        """
        snapshot, data, pristine = self._snapshot, self._data, None
        get = snapshot.get
        candidates = [key for key, value in data.items()
                      if get(key, _MISSING) is not value or type(value) not in _SCALARS]
        changed = {}
        size, new = len(self._loaded), 0
        for key in candidates:
            value = data[key]
            before = get(key, _MISSING)
            if type(value) is str and type(before) is str:     # the common case, without encoding twice
                if value != before:
                    changed[key] = value
                    size += len(_encode_str(value)) - len(_encode_str(before))
                continue
            after = _check_json(key, value)
            if before is _MISSING:
                changed[key] = value
                size += len(_encode_str(key)) + len(after) + 2        # "key":value and a comma
                new += 1
                continue
            if type(before) not in _SCALARS:           # may have been edited in place
                if pristine is None:
                    pristine = _decode_fast(self._loaded)
                before = pristine[key]
            old = _encode_fast(before)
            if after != old:
                changed[key] = value
                size += len(after) - len(old)
        deleted = []
        if len(data) - new < len(snapshot):           # some loaded key is gone
            deleted = [key for key in snapshot if key not in data]
            for key in deleted:
                before = snapshot[key]
                if type(before) not in _SCALARS:
                    if pristine is None:
                        pristine = _decode_fast(self._loaded)
                    before = pristine[key]
                size -= len(_encode_str(key)) + len(_encode_fast(before)) + 2
        return changed, deleted, max(size, 2)

    def _maybe_reap(self):
        """Opportunistic reaping: at most once per reap interval per process, and per store across
        processes (the container skips when another process reaped recently or is reaping now), and
        bounded by ``DEFAULTS["reap_budget"]`` seconds of walking."""
        now = self._clock()
        container = self.container
        if now < container._next_reap:
            return
        container._next_reap = now + self._reap_interval
        try:
            container.reap(now, budget=DEFAULTS["reap_budget"], interval=self._reap_interval)
        except (SesskitError, OSError):
            pass   # reaping is housekeeping: it must never fail the request that happened to trigger it


def _expiry(created, timeout, max_age, now):
    """When a session used at ``now`` expires: ``timeout`` later, but never past ``max_age``."""
    expires = now + timeout
    if max_age:
        expires = min(expires, created + max_age)
    return expires


def _touch_interval(timeout):
    """How far the expiry must have moved before a read pushes it forward (and the cookie follows)."""
    return min(DEFAULTS["touch_interval"], timeout / 10)


def _session_options(timeout, max_age, lock, lock_timeout, clock, max_size, reap_interval):
    """Session's keyword arguments, with DEFAULTS for those given as None."""
    return dict(
        timeout=DEFAULTS["timeout"] if timeout is None else timeout,
        max_age=DEFAULTS["max_age"] if max_age is None else max_age,
        lock=lock,
        lock_timeout=DEFAULTS["lock_timeout"] if lock_timeout is None else lock_timeout,
        clock=time.time if clock is None else clock,
        max_size=DEFAULTS["max_size"] if max_size is None else max_size,
        reap_interval=DEFAULTS["reap_interval"] if reap_interval is None else reap_interval,
    )


def open_session(sid=None, store=None, *, timeout=None, max_age=None, lock="merge", lock_timeout=None,
                 clock=None, max_size=None, reap_interval=None, environ=None, cookie_name="sesskit",
                 secret=None, route=None, secure=None, httponly=True, samesite="Lax", path="/",
                 domain=None, persistent=True, partitioned=False, refresh=False, codec=None) -> Session:
    """Open the session ``sid`` (or a new one) for one ``with`` block.

    :param sid: the id the client sent, or None. An id that is malformed, unknown or expired is never
        adopted: the block then gets a new session with a new id (check ``s.is_new`` and ``s.id``).
    :param store: a store URL or Container; default: ``$SESSKIT_STORE``, else a per-user 0700 directory.
    :param timeout: sliding inactivity timeout in seconds for a new session (stored with it).
    :param max_age: absolute lifetime in seconds for a new session (0 or None: none).
    :param lock: ``"merge"`` (default): the block works on a snapshot and holds no lock; at write-back,
        under the session's lock, only the keys it changed or deleted are applied to the record as it is
        then, so concurrent requests writing different keys lose nothing (same key: last writer wins).
        ``"exclusive"``: the session's lock is held from load to the end of the block, serialising the
        requests of one session. ``"read"``: a read-only snapshot; writing raises ReadOnlySession.
    :param lock_timeout: seconds to wait for the session's lock in exclusive mode. (The write-back of
        merge mode holds the lock for the time of one write and waits up to ``DEFAULTS["lock_timeout"]``.)
    :param clock: a function returning epoch seconds (tests inject one).
    :param max_size: bytes the serialised data may take (SessionTooLarge beyond, nothing stored).
    :param reap_interval: seconds between opportunistic reaps of the store triggered at the end of a
        block (0 disables them); each one stops after ``DEFAULTS["reap_budget"]`` seconds.
    :param environ: a CGI environment (``os.environ``) or WSGI environ: the id is then read from the
        request's cookie (do not pass ``sid`` too), and the session gains ``cookie_header()``, which
        returns the ``Set-Cookie`` line the response needs. ``cookie_name``, ``secret``, ``route``,
        ``secure``, ``httponly``, ``samesite``, ``path``, ``domain``, ``persistent``, ``partitioned``
        and ``refresh`` describe the cookie as for ``SessionMiddleware`` (they apply only with
        ``environ``).
    :param codec: ``"tagged"`` lets values also be tuples, bytes, datetimes, dates, UUIDs and Decimals
        (at any depth), stored as one-key JSON objects such as ``{"~bytes": "/w=="}``, so that the
        store still holds plain JSON; a dict whose only key starts with "~" is wrapped in
        ``{"~dict": ...}``. Default: plain JSON (tuples come back as lists).
    :raises LockTimeout: a lock could not be had in time (the stored session is unchanged).

    An exception inside the block discards its changes and releases every lock. A session that another
    request deleted or that expired while the block ran is not resurrected by its write-back (``s.lost``).
    A new session is stored only once it holds data, or when ``save()`` is called explicitly.
    """
    options = _session_options(timeout, max_age, lock, lock_timeout, clock, max_size, reap_interval)
    if store is not None:
        container = open_store(store)
    else:
        container = _default_store() if environ is None else _request_store(environ)
    if environ is None:
        return Session(sid, container, codec=codec, **options)
    if sid is not None:
        raise ValueError("give open_session() either sid or environ, not both")
    _refuse_second_session(environ, cookie_name, lock)
    cookie = _Cookie(cookie_name, secret=secret, route=route, secure=secure, httponly=httponly,
                     samesite=samesite, path=path, domain=domain, persistent=persistent,
                     partitioned=partitioned, refresh=refresh)
    return _web_session(environ, container, cookie, False, codec=codec, **options)


def _refuse_second_session(environ, cookie_name, lock):
    """Refuse to open, in exclusive mode, the session a SessionMiddleware already gives this request
    (or any mode beside its exclusive one): the request would wait for its own lock until LockTimeout."""
    if type(environ) is not dict:
        return                          # os.environ (CGI): no middleware there
    for value in environ.values():
        if (isinstance(value, _WebSession) and value._cookie.name == cookie_name
                and value._state is not _CLOSED and "exclusive" in (lock, value.mode)):
            raise SesskitError(
                "this request's session is already open through SessionMiddleware; use "
                "environ['sesskit.session'] instead of opening it again (a second exclusive opening "
                "would wait for its own lock), and choose the lock mode per request with "
                "SessionMiddleware(lock=function_of_environ)")


###############################################################################
# WSGI & CGI ##################################################################
###############################################################################

# A session travels in one cookie whose value is the session id, then (with a secret) a MAC of the id,
# then (with a route) "." and the route:
#
#     <44-character id><16-character MAC>.<route>
#
# The id and the MAC have fixed lengths, so they need no separator, and the first "." starts the route:
# mod_proxy_balancer's stickysession and Tomcat's jvmRoute take the route from after the first period.
# Every character is one of [A-Za-z0-9_-] or ".", which need no quoting in a cookie nor escaping in a URL.
# The MAC covers the id only: a route is a routing hint, never trusted, and an id loads on any node.

_MAC_LENGTH = 16                # base64url characters: 12 bytes (96 bits) of HMAC-SHA256
_MAX_COOKIE_VALUES = 8          # values of our cookie looked at (a browser sends one per matching path)
_SAMESITE = ("Lax", "Strict", "None")


def _cookie_values(header, name):
    """The values of cookie ``name`` in a ``Cookie`` request header, in order.

    Tolerant by design (unlike http.cookies.SimpleCookie, which drops every cookie of a header when one
    piece does not parse): each ``;``-separated piece stands alone and garbage pieces are skipped. The
    whole header is searched, so that a long header (the cookies of other apps) never hides ours, but the
    work is bounded: one pass of the regular expression engine, and at most ``_MAX_COOKIE_VALUES``
    values are returned. Never raises.
    """
    if type(header) is not str:
        return []
    pattern = _cookie_patterns.get(name)
    if pattern is None:
        import re       # already imported by json, so free
        pattern = _cookie_patterns[name] = re.compile(r"(?:^|;)[ \t]*%s[ \t]*=([^;]*)" % re.escape(name))
    values = []
    for match in pattern.finditer(header):
        value = match.group(1).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        values.append(value)
        if len(values) == _MAX_COOKIE_VALUES:
            break
    return values


_cookie_patterns = {}


def _is_https(environ):
    """Whether the request came over HTTPS: ``wsgi.url_scheme`` (WSGI) or ``HTTPS`` (CGI servers)."""
    if environ.get("wsgi.url_scheme") == "https":
        return True
    return str(environ.get("HTTPS", "")).lower() in ("on", "1", "yes", "true")


def _check_attribute(what, value):
    if not isinstance(value, str) or not value or any(c in value for c in ';,"\\') \
            or any(ord(c) < 33 or ord(c) > 126 for c in value):
        raise ValueError(f"{what} must be a non-empty string of visible ASCII without ;,\"\\: {value!r}")
    return value


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(when):
    """``when`` (epoch seconds) as an HTTP date (RFC 9110 IMF-fixdate), without the locale's names."""
    t = time.gmtime(when)
    return (f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def _secret_keys(secret):
    """``secret=`` as a list of MAC keys (bytes): one str/bytes, or a list whose first signs."""
    if secret is None:
        return None
    items = [secret] if isinstance(secret, (str, bytes, bytearray)) else list(secret)
    keys = [item.encode("utf-8") if isinstance(item, str) else bytes(item) for item in items]
    if not keys or not all(keys):
        raise ValueError("secret must be a non-empty string, or a non-empty list of them")
    return keys


class _Cookie:
    """How a session id travels in a cookie: the name, the attributes, the optional MAC keys and route.

    Validated once (ValueError names the bad option) and shared by all requests of a middleware.
    ``secret`` may be a list: the first key signs, every key verifies (key rotation).
    """

    def __init__(self, name="sesskit", *, secret=None, route=None, secure=None, httponly=True,
                 samesite="Lax", path="/", domain=None, persistent=True, partitioned=False, refresh=False):
        if not isinstance(name, str) or not name or name.strip(_SID_ALPHABET + "."):
            raise ValueError(f"cookie_name must be letters, digits, '-', '_' or '.': {name!r}")
        if route is not None and (not isinstance(route, str) or not route or route.strip(_SID_ALPHABET)):
            raise ValueError(f"route must be letters, digits, '-' or '_': {route!r}")
        if samesite is not None and samesite not in _SAMESITE:
            raise ValueError(f"samesite must be one of {', '.join(_SAMESITE)} or None, not {samesite!r}")
        if not _check_attribute("path", path).startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        if domain is not None:
            _check_attribute("domain", domain)
        self.name, self.route, self.secure, self.httponly = name, route, secure, bool(httponly)
        self.samesite, self.path, self.domain, self.persistent = samesite, path, domain, bool(persistent)
        self.partitioned, self.refresh = bool(partitioned), bool(refresh)
        self._keys = _secret_keys(secret)

    @staticmethod
    def _mac(key, sid):
        import hashlib   # only with a secret, so that `import sesskit` stays cheap
        import hmac
        digest = hmac.new(key, sid.encode("ascii"), hashlib.sha256).digest()[:12]
        return binascii.b2a_base64(digest, newline=False).translate(_URLSAFE).decode("ascii")

    def encode(self, sid):
        """The cookie value for ``sid`` (signed with the first key)."""
        value = sid if self._keys is None else sid + self._mac(self._keys[0], sid)
        return value if self.route is None else f"{value}.{self.route}"

    def decode(self, value):
        """The session id in cookie value ``value``, or None when it is malformed or no key's MAC matches.

        Touches no store: forged and random values cost one HMAC per key at most.
        """
        head = value.partition(".")[0]
        if self._keys is None:
            return head if is_valid_session_id(head) else None
        sid, mac = head[:SID_LENGTH], head[SID_LENGTH:]
        if len(mac) != _MAC_LENGTH or mac.strip(_SID_ALPHABET) or not is_valid_session_id(sid):
            return None
        import hmac
        return sid if any(hmac.compare_digest(mac, self._mac(key, sid)) for key in self._keys) else None

    def candidates(self, environ):
        """``(sid, value)`` for each of the request's values of our cookie that decodes, in order, the
        first value of each id only.

        A browser sends one value per matching Path and Domain, most specific path first; a stale one
        from an old Path or Domain may come first, so the caller tries the next when one is unknown.
        """
        found = []
        for value in _cookie_values(environ.get("HTTP_COOKIE"), self.name):
            sid = self.decode(value)
            if sid is not None and all(sid != seen for seen, _ in found):
                found.append((sid, value))
        return found

    def read_all(self, environ):
        """The session ids of ``candidates()``."""
        return [sid for sid, _ in self.candidates(environ)]

    def read(self, environ):
        """The session id of a request: the first value of our cookie that decodes, else None."""
        sids = self.read_all(environ)
        return sids[0] if sids else None

    def header(self, sid, max_age, https, now=None):
        """A ``Set-Cookie`` value: ``sid`` for ``max_age`` seconds (None: until the browser closes), or
        with ``sid`` None an expired cookie that makes the browser drop ours. ``Expires`` goes beside
        ``Max-Age`` for clients that know only the older attribute."""
        parts = [f"{self.name}={'' if sid is None else self.encode(sid)}", f"Path={self.path}"]
        if self.domain is not None:
            parts.append(f"Domain={self.domain}")
        if sid is None:
            parts.append("Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT")
        elif max_age is not None:
            seconds = max(0, int(max_age + 0.5))
            when = (time.time() if now is None else now) + seconds
            parts.append(f"Max-Age={seconds}; Expires={_http_date(when)}")
        if self.secure or (self.secure is None and https):
            parts.append("Secure")
        if self.httponly:
            parts.append("HttpOnly")
        if self.samesite is not None:
            parts.append(f"SameSite={self.samesite}")
        if self.partitioned:
            parts.append("Partitioned")
        return "; ".join(parts)


def _loading(name):
    """An attribute of a _WebSession: reading it loads a lazily opened session first."""
    def get(self):
        if self._state is _UNLOADED and self._lazy:
            self.load()
        return self.__dict__.get(name)

    def set(self, value):
        self.__dict__[name] = value
    return property(get, set)


class _WebSession(Session):
    """The Session of a web request (``open_session(environ=...)`` and ``SessionMiddleware``).

    It knows the request's cookie and adds ``cookie_header()``. The middleware's sessions are lazy: the
    first use of the mapping or of ``id``/``is_new``/``created``/``expires``/``timeout`` loads them, and
    a request that never uses its session does no store I/O at all.

    The response headers go out once (``cookie_header()``, or the middleware's start_response). Then
    what the session did so far is saved, and ``Set-Cookie`` says what the client must now hold: the
    id of a session that was stored new, rotated or reached through a forward, or whose timeout or
    expiry moved; an expired cookie after ``delete()``, and only then; nothing for a stale session or
    when the write-back was lost (the session was deleted or rotated by another request, whose own
    response tells the client). Afterwards the cookie can no longer change, so ``regenerate()``,
    ``delete()`` and writing into a new session that got no cookie raise SesskitError instead of
    silently losing their effect. Headers printed after ``close()`` get the cookie of what close()
    stored.
    """

    _lazy = False           # loaded on first use
    _sent = False           # the response headers are out
    _https = False
    _cookie = None
    _cookie_due = None      # the Set-Cookie value owed after close()

    id = _loading("id")
    is_new = _loading("is_new")
    created = _loading("created")
    expires = _loading("expires")

    _more = ()              # further ids the request's cookie header named, tried in order
    _values = None          # {sid: the cookie value the client sent for it}

    def _live(self):
        if self._state is _UNLOADED and self._lazy:
            self.load()
        return Session._live(self)

    def _load(self, now):
        Session._load(self, now)
        if not self.is_new or not self._more:
            return
        # A value of an old Path or Domain, unknown or rotated away, must not shadow the live one: the
        # first value that loads a session wins; if none does, the first decides (new, or stale).
        first = self._incoming
        for sid in self._more:
            self._incoming = sid
            Session._load(self, now)
            if not self.is_new:
                return
        self._incoming = first
        Session._load(self, now)

    @property
    def timeout(self):
        self._live()
        return self._timeout

    @timeout.setter
    def timeout(self, seconds):
        self._live()
        Session.timeout.fset(self, seconds)

    def __repr__(self):
        if self._state is _UNLOADED:
            return "<sesskit.Session (not loaded yet)>"
        return Session.__repr__(self)

    def _check_unsent(self, what):
        if self._sent:
            raise SesskitError(f"{what} after the response headers went out: the cookie can no longer "
                               "change (call it before start_response / cookie_header())")

    def __setitem__(self, key, value):
        self._live()
        if self._sent and self.is_new:
            self._check_unsent("storing data in a new session")
        Session.__setitem__(self, key, value)

    def __delitem__(self, key):
        self._live()
        if self._sent and self.is_new:
            self._check_unsent("changing a new session")
        Session.__delitem__(self, key)

    def regenerate(self, grace=0.0):
        self._live()
        self._check_unsent("regenerate()")
        return Session.regenerate(self, grace)

    def delete(self):
        self._live()
        self._check_unsent("delete()")
        Session.delete(self)

    def cookie_header(self):
        """Return the ``Set-Cookie: ...`` line this response needs, or None; call it when printing headers.

        Called inside the block, it first saves what the block did so far, so the client's next request
        finds it (later changes are saved at the end of the block); called after the block, it returns
        what the block's final save needs. Can be called once.
        """
        value = self._headers_out()
        return None if value is None else f"Set-Cookie: {value}"

    def _headers_out(self):
        """The response headers go out now: save what the session did so far and return the
        ``Set-Cookie`` value the response needs, or None."""
        if self._sent:
            raise SesskitError("the response headers of this session already went out")
        self._sent = True
        if self._state is _CLOSED:
            return self._cookie_due
        if self._state is _UNLOADED:
            return None                 # never used: nothing to say, no store I/O
        now = self._clock()
        before = (self.expires, self._stored_timeout)
        self._save(now)
        return self._set_cookie(now, *before)

    def _close(self, now, discard):
        if self._state is _OPEN and not discard and not self._sent:
            before = (self.expires, self._stored_timeout)
            Session._close(self, now, discard)
            self._cookie_due = self._set_cookie(now, *before)
        else:
            Session._close(self, now, discard)

    def _set_cookie(self, now, expires_before, timeout_before):
        """The ``Set-Cookie`` value after a write-back, given the expiry and stored timeout before it."""
        cookie = self._cookie
        if self.stale or self.lost:
            return None                 # only delete() may expire the client's cookie
        if self._stored is None:
            return cookie.header(None, None, self._https) if self.deleted else None
        expires = self._expiry(now)
        # the expiry moved only if this response's write-back or touch moved it: a record that another
        # request deleted or rotated meanwhile is not touched, and its id must not be sent again. The
        # cookie is re-sent at such a touch, persistent or not, so that changed cookie settings reach
        # existing clients; at once when the value the client holds is not what it would get now (a
        # rotated secret, a new route); and on every request with ``refresh``.
        refreshed = (self.saved or self._touched) and expires - expires_before >= _touch_interval(
            self._timeout)
        sent = (self._values or {}).get(self._stored)
        if (self._stored != self._incoming or self._timeout != timeout_before or refreshed
                or cookie.refresh or (sent is not None and sent != cookie.encode(self._stored))):
            return cookie.header(self._stored, expires - now if cookie.persistent else None, self._https)
        return None


def _shared_store(store):
    """The container of ``store`` (a URL, a Container, or None for the default store), one per URL and
    process, so that framework adapters do not reopen the store on every request."""
    if store is None:
        return _default_store()
    if isinstance(store, Container):
        return store
    key = (store, os.getpid())
    container = _default_stores.get(key)
    if container is None:
        container = _default_stores[key] = open_store(store)
    return container


_warned_temporary = False


def _request_store(environ):
    """The store of a web request when none was configured: ``SESSKIT_STORE`` from the request's
    environ (Apache's ``SetEnv`` lands there under mod_wsgi, not in ``os.environ``), else the embedded
    default. Falling back to a temporary directory under a web server is said once per process, loudly
    (to the server's error log and the "sesskit" logger): such a directory is private to the server's
    user and may be wiped on restart (systemd's PrivateTmp)."""
    global _warned_temporary
    url = environ.get("SESSKIT_STORE")
    if isinstance(url, str) and url:
        return _shared_store(url)
    container = _default_store()
    if not os.environ.get("SESSKIT_STORE") and not _warned_temporary:
        _warned_temporary = True
        message = (f"sesskit: no session store configured (store=..., or SESSKIT_STORE in the "
                   f"environment or, with Apache, SetEnv SESSKIT_STORE); sessions go to {container!r}, "
                   f"a temporary directory private to user {_process_user()} that a restart may wipe")
        errors = environ.get("wsgi.errors")
        if errors is not None:
            try:
                errors.write(message + "\n")
                errors.flush()
            except (OSError, ValueError, AttributeError):
                pass
        import logging
        logging.getLogger("sesskit").warning(message)
    return container


def _web_session(environ, container, cookie, lazy, **options):
    found = cookie.candidates(environ)
    session = _WebSession(found[0][0] if found else None, container, **options)
    session._more = [sid for sid, _ in found[1:]]
    session._values = dict(found)
    session._cookie = cookie
    session._https = _is_https(environ)
    session._lazy = lazy
    return session


class _Response:
    """The response iterable of SessionMiddleware: passes the app's body through, then on close()
    closes the session: saves it, or discards its changes when the app failed."""

    def __init__(self, result, session):
        self._result = result
        self._session = session
        self.started = False    # start_response ran without exc_info
        self.failed = False
        self._closed = False

    def __iter__(self):
        try:
            yield from self._result
        except GeneratorExit:
            raise               # the server stopped early (client gone): not an application error
        except BaseException:
            self.failed = True
            raise

    def close(self):
        if self._closed:
            return
        self._closed = True
        error = None
        try:
            if hasattr(self._result, "close"):
                self._result.close()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(error)

    def finish(self, error=None):
        """End the session: save (then maybe reap), or discard on ``error`` or a failed response. A
        session the request never used does no store I/O."""
        session = self._session
        if session._state is _UNLOADED:
            return
        session.close(discard=error is not None or self.failed or not self.started)


class SessionMiddleware:
    """WSGI middleware giving each request a session at ``environ["sesskit.session"]``.

    The session is a Session (see ``open_session``) loaded on first use: a request that never uses it
    does no store I/O and gets no cookie. Write-back happens in two steps:

    * when the app calls ``start_response``, what the app did to the session so far is saved and the
      ``Set-Cookie`` header is added if needed (new session holding data, rotated session, moved
      expiry, expired cookie after ``delete()``), so the client's next request, which may reach another
      process before this one has finished, already finds it;
    * changes made while the body is produced are saved when the server closes the response iterable,
      after the body was sent.

    An exception from the app (before start_response, or while producing the body) or an error
    ``start_response(..., exc_info)`` discards the changes not yet saved. After start_response,
    ``regenerate()``/``delete()`` and storing data in a new session raise SesskitError: the cookie can
    no longer change. In exclusive mode the session's lock is held until close().

    ``lock`` is a lock mode, or a function of the WSGI environ returning one, so that one endpoint can
    run in exclusive mode beside merge-mode endpoints on the same cookie (for example
    ``lock=lambda environ: "exclusive" if environ["PATH_INFO"] == "/checkout" else "merge"``).

    Opportunistic reaping (every ``reap_interval`` seconds per store) runs in close(), after the
    response, bounded by ``DEFAULTS["reap_budget"]``.

    Cookie options: ``cookie_name``; ``secure`` (None: exactly when the request came over HTTPS);
    ``httponly``; ``samesite`` ("Lax", "Strict", "None" or None to omit); ``path``; ``domain``;
    ``persistent`` (True: Max-Age follows the session's expiry; False: a browser-session cookie);
    ``secret`` (ids carry a keyed MAC; forged values are rejected before any store access; a list:
    the first key signs, all verify); ``route`` (the cookie value ends in ``.route`` for sticky load
    balancing; ids with any route load anywhere); ``partitioned`` (adds ``Partitioned``, for cookies
    in third-party contexts, which browsers then also want ``Secure``); ``refresh`` (re-send the
    cookie on every request that uses the session, not only when something changed).
    """

    def __init__(self, app, store=None, cookie_name="sesskit", timeout=None, secure=None, httponly=True,
                 samesite="Lax", path="/", domain=None, route=None, lock="merge", *, secret=None,
                 persistent=True, max_age=None, lock_timeout=None, max_size=None, reap_interval=None,
                 clock=None, environ_key="sesskit.session", partitioned=False, refresh=False, codec=None):
        if not callable(lock) and lock not in LOCK_MODES:
            raise ValueError(f"lock must be one of {', '.join(LOCK_MODES)} or a function of the "
                             f"environ, not {lock!r}")
        self.app = app
        self.environ_key = environ_key
        self.lock = lock
        self.cookie = _Cookie(cookie_name, secret=secret, route=route, secure=secure, httponly=httponly,
                              samesite=samesite, path=path, domain=domain, persistent=persistent,
                              partitioned=partitioned, refresh=refresh)
        self._container = None if store is None else open_store(store)
        self._options = _session_options(timeout, max_age, "merge", lock_timeout, clock, max_size,
                                         reap_interval)
        self._options["codec"] = codec      # "tagged": values beyond JSON, see open_session

    def __call__(self, environ, start_response):
        container = self._container if self._container is not None else _request_store(environ)
        options = self._options
        if callable(self.lock):
            options = dict(options, lock=self.lock(environ))
        else:
            options = dict(options, lock=self.lock)
        session = _web_session(environ, container, self.cookie, True, **options)
        environ[self.environ_key] = session
        response = None

        def session_start_response(status, headers, exc_info=None):
            if exc_info is not None:
                response.failed = True
                session._sent = True
            elif not session._sent:
                value = session._headers_out()
                if value is not None:
                    headers = list(headers) + [("Set-Cookie", value)]
                response.started = True
            return start_response(status, headers, exc_info)

        response = _Response(None, session)
        try:
            response._result = self.app(environ, session_start_response)
        except BaseException as exc:
            response.finish(exc)
            raise
        return response


###############################################################################
# Frameworks: Django and Flask ################################################
###############################################################################

# Both frameworks split a request's session into a load at first use and a save at the end, with the
# whole dict in between. Their adapters keep that dict, as the frameworks expect, beside a sesskit Session
# opened at load; at save they hand the Session each value that may have changed (it compares JSON, so
# only keys that really changed are written) and each deleted key, then write back. So concurrent requests
# of one session lose nothing, as in the ``with`` block. Neither framework is imported before its adapter
# is used: Django's SessionStore and FlaskSessionInterface are built by the module's ``__getattr__``.

# The tagged codec: values beyond JSON as one-key JSON objects, so that a plain JSON reader still sees JSON.
# A dict whose only key starts with "~" is wrapped in {"~dict": ...} so it never reads back as a tag.
_TAG_ESCAPE = "~dict"


def _codec_types():
    """The tagged codec's built-in types: (tag, type, to JSON, from JSON), most specific first."""
    global _CODEC
    if _CODEC is None:
        import base64
        import datetime
        import decimal
        import uuid
        _CODEC = (
            ("~tuple", tuple, None, None),       # items are (un)tagged recursively
            ("~bytes", bytes, lambda v: base64.b64encode(v).decode("ascii"), base64.b64decode),
            ("~datetime", datetime.datetime, datetime.datetime.isoformat, datetime.datetime.fromisoformat),
            ("~date", datetime.date, datetime.date.isoformat, datetime.date.fromisoformat),
            ("~uuid", uuid.UUID, str, uuid.UUID),
            ("~decimal", decimal.Decimal, str, decimal.Decimal),
        )
    return _CODEC


_CODEC = None


def _tag(value, extra=()):
    """``value`` with tuples, bytes, datetimes, dates, UUIDs and Decimals (and the ``extra`` types, given
    as (tag, type, to JSON, from JSON)) turned into tagged JSON objects. Returns ``value`` itself when
    nothing in it needed a tag; leaves other types alone (the Session then refuses them, naming the key)."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is list:
        items = [_tag(item, extra) for item in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if kind is dict:
        items = {key: _tag(item, extra) for key, item in value.items()}
        if len(items) == 1 and type(next(iter(items))) is str and next(iter(items)).startswith("~"):
            return {_TAG_ESCAPE: items}
        return value if all(items[key] is item for key, item in value.items()) else items
    for tag, cls, dump, _ in itertools.chain(extra, _codec_types()):
        if isinstance(value, cls):
            if cls is tuple:
                return {tag: [_tag(item, extra) for item in value]}
            return {tag: dump(value)}
    return value


def _untag(value, extra=()):
    """The inverse of ``_tag``: ``value`` itself when it holds no tag. A tag that does not decode is
    left as the JSON object it is."""
    kind = type(value)
    if kind is list:
        items = [_untag(item, extra) for item in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if kind is not dict:
        return value
    if len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag == _TAG_ESCAPE and type(inner) is dict:
            return {key: _untag(item, extra) for key, item in inner.items()}
        for name, cls, _, load in itertools.chain(extra, _codec_types()):
            if tag == name:
                try:
                    if cls is tuple:
                        return tuple(_untag(item, extra) for item in inner)
                    return load(inner)
                except (TypeError, ValueError, ArithmeticError):
                    return value
    items = {key: _untag(item, extra) for key, item in value.items()}
    return value if all(items[key] is item for key, item in value.items()) else items


def _sync_into(session, data, loaded, extra=()):
    """Bring Session ``session`` to the content of dict ``data``: delete the keys ``data`` lacks and set
    every value that may differ from ``loaded`` (the dict handed out at load). A value still bound to the
    very immutable object it was loaded with is skipped; the Session compares the rest as JSON."""
    for key in [key for key in session if key not in data]:
        del session[key]
    for key, value in data.items():
        if type(value) in _SCALARS and loaded.get(key, _MISSING) is value:
            continue
        session[key] = _tag(value, extra)


def _open_loaded(sid, container, lock="merge", timeout=None):
    """A loaded Session of ``sid`` (a new one when ``sid`` is unknown) for a framework adapter."""
    return open_session(sid, container, lock=lock, timeout=timeout).load()


def _django_session_store():
    """Build ``sesskit.SessionStore``, the Django session engine (``SESSION_ENGINE = "sesskit"``)."""
    from django.conf import settings
    from django.contrib.sessions.backends.base import SessionBase, UpdateError

    class SessionStore(SessionBase):
        """A Django session engine on a sesskit store; concurrent requests of one session lose no key.

        Settings: ``SESSKIT_STORE`` (a store URL; default: the embedded default store) and
        ``SESSKIT_LOCK`` ("merge", the default, "exclusive" or "read"). A subclass may set the class
        attributes ``store`` and ``lock`` instead. ``SESSION_COOKIE_AGE`` is the sliding timeout;
        ``set_expiry(seconds)`` changes it for one session, ``set_expiry(datetime)`` ends the session at
        that time. ``cycle_key()`` is ``regenerate()``, ``flush()`` deletes the session, ``create()``
        stores an empty one, ``clear_expired()`` (``manage.py clearsessions``) reaps the store.
        Session ids are sesskit's (44 characters, checked before any store access).
        """

        store = None
        lock = None

        def __init__(self, session_key=None):
            super().__init__(session_key)
            self._opened = None     # the sesskit Session loaded for this key
            self._loaded = {}       # the dict handed to Django at load, to see what changed

        @classmethod
        def _container(cls):
            store = cls.store if cls.store is not None else getattr(settings, "SESSKIT_STORE", None)
            return _shared_store(store)

        def _lock_mode(self):
            return self.lock or getattr(settings, "SESSKIT_LOCK", None) or "merge"

        def _open(self, sid, lock=None):
            session = _open_loaded(sid, self._container(), lock or self._lock_mode(),
                                   settings.SESSION_COOKIE_AGE)
            if session.mode == "exclusive":
                from django.core.signals import request_finished
                request_finished.connect(self._request_finished, weak=False)
            return session

        def _request_finished(self, **kwargs):
            from django.core.signals import request_finished
            request_finished.disconnect(self._request_finished)
            self._close(discard=True)       # what Django wanted stored was saved; release the lock

        def _close(self, discard=False):
            opened, self._opened = self._opened, None
            if opened is not None:
                opened.close(discard=discard)

        def _get_new_session_key(self):
            return new_session_id()

        def exists(self, session_key):
            if not is_valid_session_id(session_key):
                return False
            if self._opened is not None and self._opened.id == session_key and not self._opened.is_new:
                return True
            session = _open_loaded(session_key, self._container(), "read")
            try:
                return not session.is_new
            finally:
                session.close()

        def load(self):
            self._close()
            session = self._opened = self._open(self.session_key)
            if session.is_new:
                self._session_key = None       # unknown or expired: never adopted, nothing stored
            self._loaded = {key: _untag(value) for key, value in session.items()}
            return dict(self._loaded)

        def create(self):
            data = getattr(self, "_session_cache", {})
            self._close()
            session = self._opened = self._open(None)
            self._write(session, data)
            self.modified = True

        def save(self, must_create=False):
            if must_create or self.session_key is None:
                return self.create()
            data = self._get_session()          # loads first if this request has not yet
            if self._opened is None or self._opened.is_new:
                return self.create()
            self._write(self._opened, data)

        def _write(self, session, data):
            _sync_into(session, data, self._loaded)
            expiry = data.get("_session_expiry")
            if session.mode != "read":
                # set_expiry(): seconds are a sliding timeout, a datetime an end that reads never
                # slide past (one that has passed ends the session), 0 only the cookie's business
                sliding = type(expiry) is int and expiry > 0
                session.timeout = expiry if sliding else settings.SESSION_COOKIE_AGE
                if type(expiry) is str:
                    from datetime import datetime
                    session.expire_at(datetime.fromisoformat(expiry))   # naive: local time, as Django
                    if session.deleted:
                        self._close(discard=True)
                        self._session_key = None
                        return
                else:
                    session.expire_at(None)
            session.save()
            if session.lost:
                raise UpdateError("the session was deleted or expired by another request meanwhile")
            self._session_key = session.id
            self._loaded = dict(data)

        def delete(self, session_key=None):
            own = session_key is None or session_key == self.session_key
            if session_key is None:
                session_key = self.session_key
            opened = self._opened
            if own and opened is not None and opened.id == session_key and not opened.is_new:
                opened.delete()                 # under the lock this session may hold
                self._close(discard=True)
                return
            if not is_valid_session_id(session_key):
                return
            session = _open_loaded(session_key, self._container(), "merge")
            if not session.is_new:
                session.delete()
            session.close(discard=True)

        def cycle_key(self):
            data = self._session
            opened = self._opened
            if opened is None or opened.is_new:
                self.create()
                self._session_cache = data
                return
            _sync_into(opened, data, self._loaded)
            opened.regenerate()
            opened.save()
            if opened.lost:
                raise UpdateError("the session was deleted or expired by another request meanwhile")
            self._session_key = opened.id
            self._loaded = dict(data)

        @classmethod
        def clear_expired(cls):
            cls._container().reap()

    SessionStore.__module__ = __name__
    return SessionStore


def _flask_session_interface():
    """Build ``sesskit.FlaskSessionInterface``."""
    from flask.sessions import SessionInterface, SessionMixin
    from markupsafe import Markup

    markup = (("~markup", Markup, str, Markup),)

    class FlaskSession(SessionMixin):
        """The session of one Flask request: loaded from the store at first use, written back (only the
        keys that changed) by ``save_session``. ``regenerate(grace=0)`` moves it to a new id (call it
        after a login); ``clear()`` empties it and deletes it from the store (logout)."""

        def __init__(self, opener, had_cookie):
            self._opener = opener
            self._had_cookie = had_cookie
            self._session = None
            self._data = None
            self._loaded = {}
            self.modified = False
            self.accessed = False
            self.new = not had_cookie

        def _live(self):
            if self._data is None:
                session = self._session = self._opener()
                self.new = session.is_new
                self._loaded = {key: _untag(value, markup) for key, value in session.items()}
                self._data = dict(self._loaded)
            return self._data

        def __getitem__(self, key):
            return self._live()[key]

        def __setitem__(self, key, value):
            self._live()[key] = value
            self.modified = True

        def __delitem__(self, key):
            del self._live()[key]
            self.modified = True

        def __iter__(self):
            return iter(self._live())

        def __len__(self):
            return len(self._live())

        def __contains__(self, key):
            return key in self._live()

        # Like Flask's own session, every mutating call counts as a change, even one that changed nothing
        # (pop of a missing key), so that the response then expires the cookie of an empty session.
        def pop(self, key, *default):
            self.modified = True
            return self._live().pop(key, *default)

        def popitem(self):
            self.modified = True
            return self._live().popitem()

        def setdefault(self, key, default=None):
            self.modified = True
            return self._live().setdefault(key, default)

        def update(self, *args, **kwargs):
            self.modified = True
            self._live().update(*args, **kwargs)

        def clear(self):
            self.modified = True
            self._live().clear()

        def __repr__(self):
            return f"<sesskit FlaskSession {self._data if self._data is not None else '(not loaded)'}>"

        def regenerate(self, grace=0.0):
            self._live()
            self._session.regenerate(grace)
            self.modified = True

    class FlaskSessionInterface(SessionInterface):
        """Server-side Flask sessions on a sesskit store: ``app.session_interface =
        sesskit.FlaskSessionInterface(store="file:/var/lib/myapp/sessions")``.

        The cookie carries only the session id, signed with the app's ``SECRET_KEY`` (verified with
        ``SECRET_KEY_FALLBACKS`` too); without a secret key the app gets Flask's null session, as with
        Flask's own sessions. ``SESSION_COOKIE_*`` settings shape the cookie, ``PERMANENT_SESSION_LIFETIME``
        is the sliding timeout in the store and the cookie's lifetime for permanent sessions, and
        ``SESSION_REFRESH_EACH_REQUEST`` re-sends the cookie of a permanent session. Values may be JSON,
        tuples, bytes, datetimes, dates, UUIDs, Decimals and Markup (the tagged codec). ``lock`` is
        "merge" (default), "exclusive" (held until the request ends) or "read".
        """

        session_class = FlaskSession

        def __init__(self, store=None, lock="merge", route=None):
            if lock not in LOCK_MODES:
                raise ValueError(f"lock must be one of {', '.join(LOCK_MODES)}, not {lock!r}")
            self.store, self.lock, self.route = store, lock, route
            self._cookies = {}

        def _cookie(self, app):
            secrets = [app.secret_key, *(app.config.get("SECRET_KEY_FALLBACKS") or ())]
            key = (self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app),
                   self.get_cookie_secure(app), self.get_cookie_httponly(app), self.get_cookie_samesite(app),
                   bool(app.config.get("SESSION_COOKIE_PARTITIONED")), tuple(secrets))
            cookie = self._cookies.get(key)
            if cookie is None:
                name, domain, path, secure, httponly, samesite, partitioned, _ = key
                cookie = _Cookie(name, secret=secrets, route=self.route, secure=bool(secure),
                                 httponly=httponly, samesite=samesite, path=path, domain=domain or None,
                                 partitioned=partitioned)
                if len(self._cookies) > 64:
                    self._cookies.clear()
                self._cookies[key] = cookie
            return cookie

        def open_session(self, app, request):
            if not app.secret_key:
                return None
            cookie = self._cookie(app)
            sids = cookie.read_all(request.environ)
            container = _shared_store(self.store)
            timeout = app.permanent_session_lifetime.total_seconds()
            if self.lock == "exclusive":
                self._close_at_teardown(app)

            def opener():
                for sid in sids[:-1]:           # a stale value (old Path or Domain) may come first
                    session = _open_loaded(sid, container, self.lock, timeout)
                    if not session.is_new:
                        return session
                    session.close(discard=True)
                return _open_loaded(sids[-1] if sids else None, container, self.lock, timeout)
            return FlaskSession(opener, bool(sids))

        def _close_at_teardown(self, app):
            if app.extensions.get("sesskit.teardown"):
                return
            app.extensions["sesskit.teardown"] = True

            @app.teardown_request
            def close_session(exc=None):
                from flask.globals import request_ctx
                session = getattr(request_ctx, "_session", None) if request_ctx else None
                if isinstance(session, FlaskSession) and session._session is not None:
                    session._session.close(discard=True)

        def save_session(self, app, session, response):
            if session.accessed:
                response.vary.add("Cookie")
            if session._data is None:
                # Never used: no store I/O, unless a permanent session's cookie is to be refreshed on
                # every request (Flask's default), which needs the session to know it is permanent.
                if not (session._had_cookie and app.config["SESSION_REFRESH_EACH_REQUEST"]):
                    return
                if not session.permanent:
                    session._session.close()
                    return
            data = session._live()
            stored = session._session
            cookie = self._cookie(app)
            https = _flask_https()
            if not data:
                if session.modified:        # emptied: delete it from the store, expire the cookie
                    if not stored.is_new:
                        stored.delete()
                    stored.close(discard=True)
                    response.headers.add("Set-Cookie", cookie.header(None, None, https))
                    response.vary.add("Cookie")
                else:
                    stored.close(discard=True)
                return
            timeout = app.permanent_session_lifetime.total_seconds()
            _sync_into(stored, data, session._loaded, markup)
            if stored.mode != "read":
                stored.timeout = timeout
            incoming = stored.id
            was_new = stored.is_new
            stored.save()
            session._loaded = dict(data)
            if stored.mode == "exclusive":
                stored.close()
            if stored.lost:
                response.headers.add("Set-Cookie", cookie.header(None, None, https))
                response.vary.add("Cookie")
                return
            if was_new or stored.id != incoming or self.should_set_cookie(app, session):
                max_age = timeout if session.permanent else None
                response.headers.add("Set-Cookie", cookie.header(stored.id, max_age, https))
                response.vary.add("Cookie")

    def _flask_https():
        from flask import request
        return request.scheme == "https"

    FlaskSession.__module__ = FlaskSessionInterface.__module__ = __name__
    return FlaskSessionInterface


#: Names built on first access by ``__getattr__``, so that ``import sesskit`` imports no framework.
_LAZY = {"SessionStore": _django_session_store, "FlaskSessionInterface": _flask_session_interface}


def __getattr__(name):
    build = _LAZY.get(name)
    if build is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = build()
    return value


# Demo application ------------------------------------------------------------------

_DEMO_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sesskit demo</title></head>
<body>
<h1>sesskit demo</h1>
<p>Visits in this session: <b id="visits">{visits}</b></p>
<p>Session: <code id="sid">{sid}</code> ({state})</p>
<table id="values">{rows}</table>
<form method="post" action="/set">
  <input name="key" id="key" placeholder="key"> <input name="value" id="value" placeholder="value">
  <button id="set" type="submit">Set</button>
</form>
<form method="post" action="/logout"><button id="logout" type="submit">Log out</button></form>
</body></html>
"""


def _demo_app(environ, start_response):
    """The page of ``python sesskit.py demo``: a visit counter, stored values, a form and a logout."""
    import html
    path = environ.get("PATH_INFO") or "/"
    if path not in ("/", "/set", "/logout"):
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]         # favicon and friends never touch the session
    session = environ["sesskit.session"]
    if environ.get("REQUEST_METHOD") == "POST":
        from urllib.parse import parse_qs
        try:
            size = min(int(environ.get("CONTENT_LENGTH") or 0), 65536)
        except ValueError:
            size = 0
        form = parse_qs(environ["wsgi.input"].read(size).decode("utf-8", "replace"))
        if path == "/logout":
            session.delete()
        elif path == "/set":
            key = (form.get("key") or [""])[0].strip()[:100]
            if key and key != "visits":
                session[key] = (form.get("value") or [""])[0][:1000]
        start_response("303 See Other", [("Location", "/"), ("Content-Type", "text/plain")])
        return [b"see /\n"]
    session["visits"] = session.get("visits", 0) + 1
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in sorted(session.items()) if k != "visits")
    body = _DEMO_PAGE.format(visits=session["visits"], sid=html.escape(_short(session.id)),
                             state="new" if session.is_new else "continued", rows=rows).encode("utf-8")
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


def _serve_demo(store, port, out):
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIServer, WSGIRequestHandler, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Handler(WSGIRequestHandler):
        def log_message(self, format, *args):   # quiet: one line per request is noise in a demo
            pass

    # the demo says where its sessions go, so the default store is given explicitly (no warning)
    app = SessionMiddleware(_demo_app, store=store if store is not None else _default_store())
    with make_server("127.0.0.1", port, app, server_class=Server, handler_class=Handler) as server:
        where = store if store is not None else f"the default store, {_default_store()!r}"
        print(f"sesskit demo on http://127.0.0.1:{server.server_port}/ (sessions in {where}); "
              "Ctrl-C stops it", file=out, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


###############################################################################
# Command-line interface ######################################################
###############################################################################

_CLI_EPILOG = """commands:
  demo                 serve a small page on 127.0.0.1 that shows its session (a visit counter, a form
                       to store a value, a logout button); sessions go to --store or the default store
  stats STORE          how many unexpired sessions STORE holds
  ls STORE             list unexpired sessions: id, expiry (UTC), size of the data in bytes
  show STORE SID       print one session (metadata and data) as JSON
  reap STORE           remove expired sessions now (progress goes to stderr)

STORE is a store URL such as file:/var/lib/myapp/sessions; admin commands never create a store.
exit status: 0 ok, 1 runtime error (bad or missing store, unknown session), 2 usage error."""


def _cli_parse(args):
    """Parse command-line ``args``; argparse raises SystemExit(2) on a usage error, (0) on --help."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="sesskit.py", description="sesskit: server-side sessions. Demo server and store admin.",
        epilog=_CLI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sesskit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser("demo", help="serve a demo page on 127.0.0.1")
    demo.add_argument("--store", help="store URL (default: $SESSKIT_STORE or a per-user directory)")
    demo.add_argument("--port", type=int, default=8080, help="TCP port (0: any free one; default 8080)")
    for name, text in (("stats", "count sessions"), ("ls", "list sessions"), ("reap", "remove expired")):
        commands.add_parser(name, help=text).add_argument("store", metavar="STORE")
    show = commands.add_parser("show", help="print one session")
    show.add_argument("store", metavar="STORE")
    show.add_argument("sid", metavar="SID")
    args = list(args)
    if len(args) == 3 and args[0] == "show" and args[2].startswith("-") and is_valid_session_id(args[2]):
        args.insert(2, "--")        # 1 id in 64 starts with "-", which argparse takes for an option
    return parser.parse_args(args)


def _store_path(url):
    """The path a store URL names (None for memory: or an unknown scheme)."""
    scheme, _, rest = str(url).partition(":")
    if scheme.lower() not in ("file", "sqlite", "lmdb") or not rest:
        return None
    return rest[2:] if rest.startswith("//") else rest


def _store_owner(url):
    """``(uid, gid)`` of an existing store's path, or None when it cannot be known."""
    path = _store_path(url)
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return None if st is None else (st.st_uid, st.st_gid)


def _as_user(owner, store, work, out, err):
    """Run ``work()`` in a child process that has become the user and group ``owner`` (for the store URL
    ``store``); return its exit status.

    The admin commands run as root act as the store's owner (the web server's user, typically): the
    store refuses directories it does not own, and files root created in it would lock that user out.
    """
    # What the command may import later, imported now: the owner may not be able to read the Python
    # installation (a pyenv under /root is 0700).
    import encodings.ascii  # noqa: F401
    import encodings.latin_1  # noqa: F401
    import pwd  # noqa: F401
    import shlex  # noqa: F401
    import threading  # noqa: F401
    scheme = str(store).partition(":")[0].lower()
    if scheme == "sqlite":
        import sqlite3  # noqa: F401
    elif scheme == "lmdb":
        try:
            import lmdb  # noqa: F401
        except ImportError:
            pass
    for stream in (out, err):
        stream.flush()
    pid = os.fork()
    if pid == 0:                                            # pragma: no cover (the child)
        code = 1
        try:
            os.setgroups([])
            os.setgid(owner[1])
            os.setuid(owner[0])
            code = work()
        except BaseException as exc:
            print(f"sesskit: {exc}", file=err)
        finally:
            for stream in (out, err):
                stream.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def _open_existing(url):
    """The container of an existing store; ContainerError for a bad URL or a missing store."""
    if not isinstance(url, str) or url.partition(":")[0].lower() == "memory":
        raise ContainerError(f"{url!r}: a memory: store lives inside one process; give a store URL "
                             "such as file:/path/to/sessions")
    try:
        return open_store(url, create=False)
    except TypeError:       # a container class without the create option
        return open_store(url)


def _cli_reap(container, err, every=2.0):
    """Reap ``container`` completely, printing progress to ``err`` every ``every`` seconds."""
    import threading
    result = {}

    def work():
        try:
            result["removed"] = container.reap()
        except BaseException as exc:    # handed to the main thread
            result["error"] = exc
    worker = threading.Thread(target=work, daemon=True)
    start = time.monotonic()
    worker.start()
    while True:
        worker.join(every)
        if not worker.is_alive():
            break
        print(f"reaping... {time.monotonic() - start:.0f} s", file=err, flush=True)
    if "error" in result:
        raise result["error"]
    return result["removed"]


def _main(argv=None, out=None, err=None) -> int:
    """Run the command line ``argv``; return the exit status (0 ok, 1 runtime error, 2 usage)."""
    import sys
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = _cli_parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    if args.command == "demo":
        try:
            return _serve_demo(args.store, args.port, err)
        except (SesskitError, OSError) as exc:
            print(f"sesskit: {exc}", file=err)
            return 1
    owner = _store_owner(args.store) if os.name == "posix" and os.geteuid() == 0 else None
    if owner is not None and owner[0] != 0:
        return _as_user(owner, args.store, lambda: _admin(args, out, err), out, err)
    return _admin(args, out, err)


def _admin(args, out, err):
    """Run the admin command ``args`` (stats, ls, show, reap); return the exit status. The store is
    closed on the way out (the CLI's entry point may be called many times in one process)."""
    container = None
    try:
        container = _open_existing(args.store)
        now = time.time()
        if args.command == "stats":
            print(f"store: {args.store}\nsessions: {container.count(now)}", file=out)
        elif args.command == "ls":
            for sid in container.sids(now):
                record = container.load(sid)
                if record is None or record.forward is not None:
                    continue
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires))
                print(f"{sid}  {when}  {len(record.data)}", file=out)
        elif args.command == "show":
            if not is_valid_session_id(args.sid):
                raise InvalidSessionId(f"not a sesskit session id: {_short(args.sid)}")
            record = container.load(args.sid)
            if record is None or record.expires < now:
                print(f"sesskit: no session {args.sid} in {args.store}", file=err)
                return 1
            print(json.dumps({"id": args.sid, "created": record.created, "expires": record.expires,
                              "timeout": record.timeout, "max_age": record.max_age,
                              "forward": record.forward,
                              "data": None if record.forward else json.loads(record.data)},
                             indent=2, sort_keys=True), file=out)
        elif args.command == "reap":
            removed = _cli_reap(container, err)
            print(f"removed {removed} expired sessions from {args.store}", file=out)
        return 0
    except (SesskitError, OSError) as exc:
        print(f"sesskit: {exc}", file=err)
        owner = _store_owner(args.store)
        if owner is not None and owner[0] != os.geteuid():
            import shlex
            import sys
            words = [sys.executable, os.path.abspath(__file__), args.command, args.store]
            if args.command == "show":
                words += ["--", args.sid]
            command = " ".join(shlex.quote(word) for word in words)
            print(f"sesskit: the store belongs to {_user_name(owner[0])}; run the command as that "
                  f"user: sudo -u {shlex.quote(_user_name(owner[0]))} {command}", file=err)
        return 1
    finally:
        if container is not None:
            container.close()


def main():
    """Entry point of ``python sesskit.py``: exit with ``_main``'s status."""
    raise SystemExit(_main())


if __name__ == "__main__":
    main()
