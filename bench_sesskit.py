#!/usr/bin/env python3
"""Side-by-side benchmark of server-side session stores, for sesskit.

Usage:
    python bench_sesskit.py [--quick] [--big] [--only NAMES]
                            [--scenarios 1,2,3,4] [--json FILE]

Every system runs the same four workloads in one run:

  1. Request cycle, one process: many ~1 KB sessions (20 short string
     keys); each request loads a random session, changes one key, saves.
     Reports requests/s and p50/p99 latency in microseconds.
  2. One hot session shared by 8 processes (and, separately, 8 threads);
     every request adds its own distinct key by load-modify-save, like
     concurrent AJAX calls of one page.  Reports requests/s, failed
     requests and lost keys.
  3. Scale: 100,000 sessions (1,000,000 with --big where the store is not
     one file per session): creation rate, p50 load and p50 save at that
     size, then 1% of the sessions are made expired and reaped: time
     taken and entries visited.
  4. Cold process (the CGI case): a new interpreter imports the library,
     opens one existing session by id, sets a key and saves.  Median ms,
     next to bare interpreter start-up and a "raw floor"; plus
     `python -X importtime` of each library's module.

Each system is driven by a small adapter class (section 3) with setup(),
request(), read() and close().  Scenario functions (section 4) only talk
to adapters.  Every scenario prints one fixed-width table with "sesskit
ratio" columns: for each sesskit container, how it compares to the row's
system, written so that a ratio above 1 always means sesskit did better
(sesskit/peer for throughput, peer/sesskit for times).

A system whose library is missing, or a sesskit container the library
does not support yet, prints "n/a (reason)" instead of failing the run.
All files live under one temporary directory that is removed at the end.

Every size is bounded, and so is time: a system that is too slow to finish
scenario 1, 2 or 3 within its time budget (FULL_SIZES/QUICK_SIZES) stops
early and its row is marked '*' with the count it reached.
"""

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import queue
import random
import secrets
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time


# ===========================================================================
# 1. Sizes and constants
# ===========================================================================

FULL_SIZES = {
    "s1_sessions": 2_000,      # scenario 1: sessions in the store
    "s1_requests": 20_000,     # scenario 1: timed requests
    "s1_warmup": 200,          # scenario 1: untimed requests first
    "s1_budget_s": 25,         # scenario 1: stop a slow system after this long
    "s2_workers": 8,           # scenario 2: processes, then threads
    "s2_requests": 300,        # scenario 2: requests per worker
    "s2_budget_s": 25,         # scenario 2: a worker stops after this long
    "s3_sessions": 100_000,    # scenario 3: sessions created
    "s3_big": 1_000_000,       # scenario 3 with --big (not file-per-session)
    "s3_samples": 2_000,       # scenario 3: loads/saves timed at that size
    "s3_budget_s": 25,         # scenario 3: creation stops after this long
    "s4_runs": 20,             # scenario 4: timed cold processes per system
    "s4_importtime_runs": 3,   # scenario 4: -X importtime runs per module
}

QUICK_SIZES = {
    "s1_sessions": 200,
    "s1_requests": 2_000,
    "s1_warmup": 20,
    "s1_budget_s": 1,
    "s2_workers": 8,           # concurrency stays the same, only length shrinks
    "s2_requests": 30,
    "s2_budget_s": 1,
    "s3_sessions": 10_000,
    "s3_big": 100_000,
    "s3_samples": 200,
    "s3_budget_s": 1,
    "s4_runs": 3,
    "s4_importtime_runs": 1,
}

KEYS_PER_SESSION = 20
VALUE_LENGTH = 40                    # 20 keys of 40 characters: ~1 KB of JSON
SESSION_TTL = 14 * 24 * 3600         # two weeks, Django's default cookie age
BACKDATE = 30 * 24 * 3600            # how far "expired" sessions are pushed back
EXPIRED_FRACTION = 0.01
LMDB_MAP_SIZE = 8 * 1024 ** 3        # virtual size; the file grows as needed
DJANGO_SECRET = "bench-sesskit-not-a-secret"
SESSKIT_PATH = os.path.dirname(os.path.abspath(__file__))   # the sesskit.py beside this script; read only
WORKER_TIMEOUT = 300                 # seconds before scenario 2 gives up
COLD_TIMEOUT = 60                    # seconds for one cold process
SEED = 20240601

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

# Set by main(): the temporary directory holding everything of this run.
RUN_ROOT = None


# ===========================================================================
# 2. Small helpers: data, timing, tables
# ===========================================================================

class NotAvailable(Exception):
    """An adapter cannot run here; str(exc) is printed as 'n/a (reason)'."""


def random_string(rng, length=VALUE_LENGTH):
    return "".join(rng.choices(ALPHABET, k=length))


_TEMPLATE_RNG = random.Random(SEED)
SESSION_TEMPLATE = {
    "k%02d" % j: random_string(_TEMPLATE_RNG) for j in range(KEYS_PER_SESSION)
}


def session_data(i):
    """The initial contents of session number i (~1 KB as JSON).

    Cheap on purpose (a dict copy): it runs inside the timed creation loop
    of scenario 3.
    """
    data = dict(SESSION_TEMPLATE)
    data["k00"] = "%040d" % i
    return data


def new_id():
    """A session id for stores that do not make their own."""
    return secrets.token_urlsafe(24)


def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def fmt_int(x):
    return "-" if x is None else "{:,.0f}".format(x)


def fmt_float(x, digits=1):
    return "-" if x is None else "{:,.{}f}".format(x, digits)


def fmt_ratio(x):
    return "-" if x is None else "{:.2f}".format(x)


def print_table(title, headers, rows, notes=()):
    """Print a fixed-width table.

    rows: lists of strings.  A row of exactly two strings whose second one
    starts with 'n/a' or 'error' is a system that did not run; it is
    printed unaligned after its name so a long reason does not widen the
    table.
    """
    full_rows = [r for r in rows if not _is_short_row(r)]
    widths = [len(h) for h in headers]
    for row in full_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    print()
    print(title)
    print("=" * len(title))
    print(_format_row(headers, widths))
    print(_format_row(["-" * w for w in widths], widths))
    for row in rows:
        if _is_short_row(row):
            print(row[0].ljust(widths[0]) + "  " + row[1])
        else:
            print(_format_row(row, widths))
    for note in notes:
        print("  " + note)
    sys.stdout.flush()


def _is_short_row(row):
    return len(row) == 2 and row[1].startswith(("n/a", "error"))


def _format_row(cells, widths):
    parts = []
    for i, cell in enumerate(cells):
        # first column left-aligned (names), the rest right-aligned (numbers)
        parts.append(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]))
    return "  ".join(parts)


def describe_error(exc):
    text = "%s: %s" % (type(exc).__name__, exc)
    return text if len(text) < 160 else text[:157] + "..."


def fresh_dir(label):
    """A new empty directory under RUN_ROOT."""
    return tempfile.mkdtemp(prefix=label + "-", dir=RUN_ROOT)


def backdate_files(root, sids, prefix="", seconds=BACKDATE):
    """Push back the mtime of every file under root named prefix + one of
    sids (the id may be followed by an extension).  Used to make sessions
    expired in stores whose expiry is the file's age."""
    wanted = {prefix + sid for sid in sids}
    old = time.time() - seconds
    touched = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.split(".")[0] in wanted:
                os.utime(os.path.join(dirpath, name), (old, old))
                touched += 1
    return touched


def sweep_old_files(root, max_age=SESSION_TTL):
    """The cron-style reaper of file-per-session stores
    (`find ROOT -type f -mmin +AGE -delete`): stat every file, delete the
    old ones.  Returns how many files were visited."""
    cutoff = time.time() - max_age
    visited = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            visited += 1
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
            except FileNotFoundError:
                pass
    return visited


class Loaded(dict):
    """A loaded session for adapters whose stores hand back plain data:
    the dict is the session, attributes carry what save() needs."""


class HeldContext:
    """A context manager entered by an adapter's load() and left by its
    save(), so scenario 3 can time the two halves of one request apart.
    Plain request() calls use a normal `with` statement instead."""

    def __init__(self, manager):
        self.manager = manager
        self.value = manager.__enter__()

    def __setitem__(self, key, value):
        self.value[key] = value

    def leave(self):
        self.manager.__exit__(None, None, None)


# ===========================================================================
# 3. Adapters, one per system
# ===========================================================================

class Adapter:
    """Drives one session store.

    The brief's interface: setup(n) -> ids, request(id, key, value),
    read(id) -> dict, close().  request() is split into load() and save()
    so scenario 3 can time both halves; create/expire/reap serve
    scenario 3, cold_snippet scenario 4.

    `directory` is an empty directory of this adapter's own.  fresh=True
    makes a new store there; fresh=False opens the existing one (a child
    process, or a check after the workers finished).
    """

    name = "?"
    shared_across_processes = True   # can 8 processes share the store?
    file_per_session = False         # True: stays at the normal size with --big
    import_module = None             # module timed with -X importtime

    def __init__(self, directory, fresh):
        self.directory = directory

    # --- the brief's interface -------------------------------------------
    def setup(self, n_sessions):
        return [self.create(session_data(i)) for i in range(n_sessions)]

    def request(self, sid, key, value):
        handle = self.load(sid)
        handle[key] = value
        self.save(handle)

    def read(self, sid):
        raise NotImplementedError

    def close(self):
        pass

    # --- the halves of request(), and the other operations ---------------
    def create(self, data):
        raise NotImplementedError

    def load(self, sid):
        raise NotImplementedError

    def save(self, handle):
        raise NotImplementedError

    def expire(self, sids):
        """Make these sessions expired the way the store records expiry."""
        raise NotAvailable("no expiry support in this adapter")

    def reap(self):
        """Remove expired sessions; return a text saying how many entries
        were visited (or None when that cannot be told)."""
        raise NotAvailable("no reaper in this adapter")

    def cold_snippet(self, sid):
        """Python source for a new interpreter: open session `sid`, set key
        'cold' to sys.argv[1], save."""
        raise NotAvailable("no cold-process snippet")

    def cold_env(self):
        """Extra environment variables for the cold process."""
        return {}


# --- Beaker ----------------------------------------------------------------

class BeakerAdapter(Adapter):
    """beaker.session.Session with type 'file' or 'dbm', one file (or dbm
    file set) per session.  Beaker has no reaper of its own; its docs
    suggest a cron job deleting old files, which sweep_old_files() does."""

    file_per_session = True
    import_module = "beaker.session"

    def __init__(self, directory, fresh, kind):
        super().__init__(directory, fresh)
        try:
            from beaker.session import Session
        except ImportError:
            raise NotAvailable("not installed")
        self.Session = Session
        self.name = "beaker-" + kind
        self.data_dir = os.path.join(directory, "data")
        self.options = {
            "type": kind,
            "data_dir": self.data_dir,
            "lock_dir": os.path.join(directory, "lock"),
            "use_cookies": False,      # we pass ids directly, no HTTP here
        }

    def create(self, data):
        session = self.Session({}, **self.options)
        session.update(data)
        session.save()
        return session.id

    def load(self, sid):
        return self.Session({}, id=sid, **self.options)

    def save(self, handle):
        handle.save()

    def read(self, sid):
        session = self.load(sid)
        return {k: v for k, v in session.items() if not k.startswith("_")}

    def expire(self, sids):
        backdate_files(self.data_dir, sids)

    def reap(self):
        visited = sweep_old_files(self.data_dir)
        return "%d (every file)" % visited

    def cold_snippet(self, sid):
        return (
            "import sys\n"
            "from beaker.session import Session\n"
            "s = Session({}, id=%r, **%r)\n"
            "s['cold'] = sys.argv[1]\n"
            "s.save()\n" % (sid, self.options)
        )


# --- cachelib (Flask-Session's file store) ---------------------------------

class CachelibAdapter(Adapter):
    """cachelib.FileSystemCache, the store behind Flask-Session's file
    backend.  threshold=0: the default (500) deletes sessions once the
    directory holds more than 500 files."""

    name = "cachelib-file"
    file_per_session = True
    import_module = "cachelib"

    def __init__(self, directory, fresh):
        super().__init__(directory, fresh)
        try:
            from cachelib.file import FileSystemCache
        except ImportError:
            raise NotAvailable("not installed")
        self.cache = FileSystemCache(directory, threshold=0, default_timeout=0)

    def create(self, data):
        sid = new_id()
        self.cache.set(sid, data, timeout=SESSION_TTL)
        return sid

    def load(self, sid):
        handle = Loaded(self.cache.get(sid) or {})
        handle.sid = sid
        return handle

    def save(self, handle):
        self.cache.set(handle.sid, dict(handle), timeout=SESSION_TTL)

    def read(self, sid):
        return self.cache.get(sid) or {}

    def expire(self, sids):
        for sid in sids:
            self.cache.set(sid, self.cache.get(sid), timeout=-BACKDATE)

    def reap(self):
        # cachelib only reaps inside set() once over `threshold`; with no
        # threshold the only way is its private _remove_expired(), which
        # opens every file to read the expiry header.
        visited = len(os.listdir(self.directory))
        self.cache._remove_expired(time.time())
        return "%d (every file)" % visited

    def cold_snippet(self, sid):
        return (
            "import sys\n"
            "from cachelib.file import FileSystemCache\n"
            "c = FileSystemCache(%r, threshold=0, default_timeout=0)\n"
            "d = c.get(%r)\n"
            "d['cold'] = sys.argv[1]\n"
            "c.set(%r, d, timeout=%d)\n" % (self.directory, sid, sid, SESSION_TTL)
        )


# --- diskcache -------------------------------------------------------------

class DiskcacheAdapter(Adapter):
    """diskcache.Cache (SQLite in WAL mode, values inline).  Eviction is
    turned off: the default policy would drop sessions past 1 GB.
    transact=True wraps load-modify-save in cache.transact(), diskcache's
    own way to make it atomic (row 'diskcache-tx')."""

    import_module = "diskcache"

    def __init__(self, directory, fresh, transact=False):
        super().__init__(directory, fresh)
        try:
            import diskcache
        except ImportError:
            raise NotAvailable("not installed")
        self.name = "diskcache-tx" if transact else "diskcache"
        self.transact = transact
        self.cache = diskcache.Cache(directory, eviction_policy="none")

    def create(self, data):
        sid = new_id()
        self.cache.set(sid, data, expire=SESSION_TTL)
        return sid

    def request(self, sid, key, value):
        if not self.transact:
            return super().request(sid, key, value)
        with self.cache.transact():
            data = self.cache.get(sid) or {}
            data[key] = value
            self.cache.set(sid, data, expire=SESSION_TTL)

    def load(self, sid):
        held = HeldContext(self.cache.transact()) if self.transact else None
        handle = Loaded(self.cache.get(sid) or {})
        handle.sid = sid
        handle.held = held
        return handle

    def save(self, handle):
        self.cache.set(handle.sid, dict(handle), expire=SESSION_TTL)
        if handle.held is not None:
            handle.held.leave()

    def read(self, sid):
        return self.cache.get(sid) or {}

    def expire(self, sids):
        for sid in sids:
            self.cache.touch(sid, expire=-BACKDATE)

    def reap(self):
        removed = self.cache.expire()
        return "~%d (expiry index)" % removed

    def close(self):
        self.cache.close()

    def cold_snippet(self, sid):
        body = (
            "d = c.get(%r)\n"
            "d['cold'] = sys.argv[1]\n"
            "c.set(%r, d, expire=%d)\n" % (sid, sid, SESSION_TTL)
        )
        if self.transact:
            body = "with c.transact():\n" + "".join(
                "    " + line + "\n" for line in body.splitlines())
        return (
            "import sys\n"
            "from diskcache import Cache\n"
            "c = Cache(%r, eviction_policy='none')\n" % self.directory
            + body + "c.close()\n"
        )


# --- Django ----------------------------------------------------------------

def django_settings_kwargs(db_path, file_path):
    return {
        "SECRET_KEY": DJANGO_SECRET,
        "INSTALLED_APPS": ["django.contrib.sessions"],
        "DATABASES": {"default": {
            "ENGINE": "django.db.backends.sqlite3", "NAME": db_path}},
        "SESSION_FILE_PATH": file_path,
        "USE_TZ": True,
    }


def django_setup():
    """Configure Django once per process: settings in-process, the
    sessions app, and its table created by running migrations.

    Settings can be configured only once per process, so one SQLite file
    (RUN_ROOT/django.sqlite3) and one session directory
    (RUN_ROOT/django-files) serve the whole run; the adapters empty them
    when they make a fresh store.  Forked workers inherit the configured
    settings and open their own connections.
    """
    try:
        import django
        from django.conf import settings
    except ImportError:
        raise NotAvailable("not installed")
    if settings.configured:
        return
    file_path = os.path.join(RUN_ROOT, "django-files")
    os.makedirs(file_path, exist_ok=True)
    settings.configure(**django_settings_kwargs(
        os.path.join(RUN_ROOT, "django.sqlite3"), file_path))
    django.setup()
    from django.core.management import call_command
    call_command("migrate", run_syncdb=True, verbosity=0)


class DjangoAdapter(Adapter):
    """What both Django backends share: a SessionStore class in self.Store."""

    def create(self, data):
        session = self.Store()
        session.update(data)
        session.save()               # no key yet: save() creates one
        return session.session_key

    def load(self, sid):
        session = self.Store(session_key=sid)
        session.keys()               # Django loads lazily; force it here
        return session

    def save(self, handle):
        handle.save()

    def read(self, sid):
        return dict(self.load(sid).items())


class DjangoFileAdapter(DjangoAdapter):
    """django.contrib.sessions.backends.file.SessionStore, files named
    'sessionid<key>' in settings.SESSION_FILE_PATH (see django_setup; the
    adapter's own directory is not used).  Expiry is the file's mtime plus
    SESSION_COOKIE_AGE (two weeks); clear_expired() loads every file."""

    name = "django-file"
    file_per_session = True
    import_module = "django.contrib.sessions.backends.file"

    def __init__(self, directory, fresh):
        super().__init__(directory, fresh)
        django_setup()
        from django.conf import settings
        from django.contrib.sessions.backends.file import SessionStore
        self.Store = SessionStore
        self.file_path = settings.SESSION_FILE_PATH
        self.prefix = settings.SESSION_COOKIE_NAME
        if fresh:
            shutil.rmtree(self.file_path)
            os.makedirs(self.file_path)

    def expire(self, sids):
        backdate_files(self.file_path, sids, prefix=self.prefix)

    def reap(self):
        visited = len(os.listdir(self.file_path))
        self.Store.clear_expired()   # loads every session file
        return "%d (every file)" % visited

    def cold_snippet(self, sid):
        return (
            "import sys\n"
            "from django.conf import settings\n"
            "settings.configure(SECRET_KEY=%r, SESSION_FILE_PATH=%r, USE_TZ=True)\n"
            "from django.contrib.sessions.backends.file import SessionStore\n"
            "s = SessionStore(session_key=%r)\n"
            "s['cold'] = sys.argv[1]\n"
            "s.save()\n" % (DJANGO_SECRET, self.file_path, sid)
        )


class DjangoDbAdapter(DjangoAdapter):
    """django.contrib.sessions.backends.db.SessionStore on SQLite with
    Django's defaults (rollback journal, no WAL)."""

    name = "django-db"
    import_module = "django.contrib.sessions.backends.db"

    def __init__(self, directory, fresh):
        super().__init__(directory, fresh)
        django_setup()
        from django.conf import settings
        from django.contrib.sessions.backends.db import SessionStore
        from django.contrib.sessions.models import Session
        self.Store = SessionStore
        self.Model = Session
        self.db_path = settings.DATABASES["default"]["NAME"]
        self.file_path = settings.SESSION_FILE_PATH
        if fresh:
            self.Model.objects.all().delete()


    def expire(self, sids):
        import datetime
        from django.utils import timezone
        past = timezone.now() - datetime.timedelta(seconds=BACKDATE)
        sids = list(sids)
        for start in range(0, len(sids), 500):
            chunk = sids[start:start + 500]
            self.Model.objects.filter(session_key__in=chunk).update(expire_date=past)

    def reap(self):
        before = self.Model.objects.count()
        self.Store.clear_expired()   # DELETE ... WHERE expire_date < now
        removed = before - self.Model.objects.count()
        return "~%d (expire_date index)" % removed

    def close(self):
        from django.db import connections
        connections.close_all()

    def cold_snippet(self, sid):
        return (
            "import sys\n"
            "import django\n"
            "from django.conf import settings\n"
            "settings.configure(**%r)\n"
            "django.setup()\n"
            "from django.contrib.sessions.backends.db import SessionStore\n"
            "s = SessionStore(session_key=%r)\n"
            "s['cold'] = sys.argv[1]\n"
            "s.save()\n" % (django_settings_kwargs(self.db_path, self.file_path), sid)
        )


# --- Raw limits of each medium ---------------------------------------------

def encode_raw(data, expires):
    """Raw stores keep an 8-byte expiry time in front of compact JSON."""
    return struct.pack("<d", expires) + json.dumps(
        data, separators=(",", ":")).encode()


def decode_raw(blob):
    return json.loads(bytes(blob[8:]))


class RawLmdbAdapter(Adapter):
    """py-lmdb: get + put inside ONE write transaction per request, so
    concurrent writers are serialised by LMDB's writer lock.  No expiry
    index: the reaper scans every entry."""

    import_module = "lmdb"

    def __init__(self, directory, fresh, sync):
        super().__init__(directory, fresh)
        try:
            import lmdb
        except ImportError:
            raise NotAvailable("not installed")
        self.name = "raw-lmdb-sync" if sync else "raw-lmdb-nosync"
        self.sync = sync
        self.env = lmdb.open(directory, map_size=LMDB_MAP_SIZE,
                             sync=sync, metasync=sync)

    def create(self, data):
        sid = new_id()
        with self.env.begin(write=True) as txn:
            txn.put(sid.encode(), encode_raw(data, time.time() + SESSION_TTL))
        return sid

    def load(self, sid):
        txn = self.env.begin(write=True)
        try:
            handle = Loaded(decode_raw(txn.get(sid.encode())))
        except BaseException:
            txn.abort()
            raise
        handle.sid = sid
        handle.txn = txn
        return handle

    def save(self, handle):
        try:
            handle.txn.put(handle.sid.encode(),
                           encode_raw(handle, time.time() + SESSION_TTL))
            handle.txn.commit()
        except BaseException:
            handle.txn.abort()
            raise

    def read(self, sid):
        with self.env.begin() as txn:
            blob = txn.get(sid.encode())
        return decode_raw(blob) if blob is not None else {}

    def expire(self, sids):
        with self.env.begin(write=True) as txn:
            for sid in sids:
                key = sid.encode()
                txn.put(key, struct.pack("<d", time.time() - BACKDATE)
                        + txn.get(key)[8:])

    def reap(self):
        now = time.time()
        visited = 0
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor()
            more = cursor.first()
            while more:
                visited += 1
                expires = struct.unpack_from("<d", cursor.value())[0]
                if expires < now:
                    more = cursor.delete()   # moves to the next entry
                else:
                    more = cursor.next()
        return "%d (every entry)" % visited

    def close(self):
        self.env.close()

    def cold_snippet(self, sid):
        return (
            "import json, struct, sys, time\n"
            "import lmdb\n"
            "env = lmdb.open(%r, map_size=%d, sync=%r, metasync=%r)\n"
            "with env.begin(write=True) as txn:\n"
            "    blob = txn.get(%r)\n"
            "    d = json.loads(bytes(blob[8:]))\n"
            "    d['cold'] = sys.argv[1]\n"
            "    txn.put(%r, struct.pack('<d', time.time() + %d)"
            " + json.dumps(d, separators=(',', ':')).encode())\n"
            "env.close()\n" % (self.directory, LMDB_MAP_SIZE, self.sync,
                               self.sync, sid.encode(), sid.encode(),
                               SESSION_TTL)
        )


class RawFileAdapter(Adapter):
    """One JSON file per session: read, write a temp file, os.replace; with
    or without fsync of the temp file (the directory is not fsynced).  No
    locking, so concurrent writers lose updates.  Expiry is the mtime."""

    file_per_session = True
    import_module = "json"

    def __init__(self, directory, fresh, fsync):
        super().__init__(directory, fresh)
        self.name = "raw-file-fsync" if fsync else "raw-file-nofsync"
        self.fsync = fsync

    def path(self, sid):
        return os.path.join(self.directory, sid)

    def write(self, sid, data):
        path = self.path(sid)
        temp = "%s.%d-%d.tmp" % (path, os.getpid(), threading.get_ident())
        with open(temp, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)

    def create(self, data):
        sid = new_id()
        self.write(sid, data)
        return sid

    def load(self, sid):
        with open(self.path(sid)) as f:
            handle = Loaded(json.load(f))
        handle.sid = sid
        return handle

    def save(self, handle):
        self.write(handle.sid, handle)

    def read(self, sid):
        try:
            with open(self.path(sid)) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def expire(self, sids):
        backdate_files(self.directory, sids)

    def reap(self):
        return "%d (every file)" % sweep_old_files(self.directory)

    def cold_snippet(self, sid):
        return raw_floor_snippet(self.path(sid), self.fsync)


class RawSqliteAdapter(Adapter):
    """SQLite in WAL mode, synchronous=NORMAL: per request BEGIN IMMEDIATE,
    SELECT the JSON text, UPDATE the row, COMMIT.  One connection per
    thread.  An index on the expiry column serves the reaper."""

    name = "raw-sqlite-wal"
    import_module = "sqlite3"

    def __init__(self, directory, fresh):
        super().__init__(directory, fresh)
        self.db_path = os.path.join(directory, "sessions.sqlite")
        self.local = threading.local()
        if fresh:
            db = self.connection()
            db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY,"
                       " expires REAL NOT NULL, data TEXT NOT NULL)")
            db.execute("CREATE INDEX sessions_expires ON sessions (expires)")

    def connection(self):
        db = getattr(self.local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self.local.db = db
        return db

    def create(self, data):
        sid = new_id()
        self.connection().execute(
            "INSERT INTO sessions VALUES (?, ?, ?)",
            (sid, time.time() + SESSION_TTL, json.dumps(data, separators=(",", ":"))))
        return sid

    def load(self, sid):
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT data FROM sessions WHERE id = ?", (sid,)).fetchone()
            handle = Loaded(json.loads(row[0]))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        handle.sid = sid
        handle.db = db
        return handle

    def save(self, handle):
        try:
            handle.db.execute(
                "UPDATE sessions SET data = ?, expires = ? WHERE id = ?",
                (json.dumps(handle, separators=(",", ":")),
                 time.time() + SESSION_TTL, handle.sid))
            handle.db.execute("COMMIT")
        except BaseException:
            handle.db.execute("ROLLBACK")
            raise

    def read(self, sid):
        row = self.connection().execute(
            "SELECT data FROM sessions WHERE id = ?", (sid,)).fetchone()
        return json.loads(row[0]) if row else {}

    def expire(self, sids):
        db = self.connection()
        db.execute("BEGIN")
        db.executemany("UPDATE sessions SET expires = ? WHERE id = ?",
                       [(time.time() - BACKDATE, sid) for sid in sids])
        db.execute("COMMIT")

    def reap(self):
        cursor = self.connection().execute(
            "DELETE FROM sessions WHERE expires < ?", (time.time(),))
        return "~%d (expiry index)" % cursor.rowcount

    def close(self):
        db = getattr(self.local, "db", None)
        if db is not None:
            db.close()
            self.local.db = None

    def cold_snippet(self, sid):
        return (
            "import json, sqlite3, sys, time\n"
            "db = sqlite3.connect(%r, timeout=60, isolation_level=None)\n"
            "db.execute('PRAGMA synchronous=NORMAL')\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "d = json.loads(db.execute('SELECT data FROM sessions WHERE id = ?',"
            " (%r,)).fetchone()[0])\n"
            "d['cold'] = sys.argv[1]\n"
            "db.execute('UPDATE sessions SET data = ?, expires = ? WHERE id = ?',"
            " (json.dumps(d, separators=(',', ':')), time.time() + %d, %r))\n"
            "db.execute('COMMIT')\n" % (self.db_path, sid, SESSION_TTL, sid)
        )


def raw_floor_snippet(path, fsync=False):
    """The least a cold process can do: import json, read the session file,
    write it back through a temp file and os.replace."""
    return (
        "import json, os, sys\n"
        "p = %r\n"
        "with open(p) as f:\n"
        "    d = json.load(f)\n"
        "d['cold'] = sys.argv[1]\n"
        "t = p + '.tmp'\n"
        "with open(t, 'w') as f:\n"
        "    json.dump(d, f, separators=(',', ':'))\n"
        "%s"
        "os.replace(t, p)\n" % (path, "    f.flush(); os.fsync(f.fileno())\n" if fsync else "")
    )


# --- Redis: the benchmark's own server, the plain patterns, redis-benchmark --

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_BENCHMARK = "/usr/bin/redis-benchmark"
_redis_server = {}          # the running server of this benchmark: pid, proc, port


def redis_port():
    """The port of this benchmark's own redis-server on loopback (no persistence, as a cache-style
    session server usually runs), started on first use and stopped by stop_redis()."""
    if "port" not in _redis_server:       # forked workers use their parent's server
        if not os.path.exists(REDIS_SERVER):
            raise NotAvailable("no redis-server (apt install redis-server)")
        try:
            import redis  # noqa: F401
        except ImportError:
            raise NotAvailable("redis not installed (pip install redis)")
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        directory = fresh_dir("redis-server")
        proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", directory, "--save", "", "--appendonly", "no",
                                 "--logfile", os.path.join(directory, "log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise NotAvailable("redis-server did not start")
            time.sleep(0.05)
        _redis_server.update(pid=os.getpid(), proc=proc, port=port)
    return _redis_server["port"]


def stop_redis():
    if _redis_server.get("pid") == os.getpid():
        proc = _redis_server.pop("proc")
        proc.terminate()
        proc.wait(20)
        _redis_server.clear()


class RedisPlainAdapter(Adapter):
    """redis-py, one key per session, as the Redis session stores people use do it:

      pickled=True  Flask-Session's Redis backend written plainly: GET the key, pickle.loads the
                    dict, change it, SETEX the pickled dict with the session lifetime.
      pickled=False raw GET + SET of the session as compact JSON (the floor of a store that
                    loads, then writes back: two round trips, no merge, no check).

    Both write the whole session back, so concurrent requests of one session lose each other's
    keys (scenario 2). Expiry is Redis' own TTL; there is nothing to reap."""

    def __init__(self, directory, fresh, pickled):
        import redis
        self.pickled = pickled
        self.name = "flask-session-redis" if pickled else "raw-redis-getset"
        self.client = redis.Redis(host="127.0.0.1", port=redis_port())
        self.prefix = "%s:" % os.path.basename(directory)

    def _dump(self, data):
        if self.pickled:
            import pickle
            return pickle.dumps(dict(data), protocol=pickle.HIGHEST_PROTOCOL)
        return json.dumps(data, separators=(",", ":"))

    def _put(self, sid, data):
        if self.pickled:
            self.client.set(self.prefix + sid, self._dump(data), ex=SESSION_TTL)    # SETEX
        else:
            self.client.set(self.prefix + sid, self._dump(data))

    def create(self, data):
        sid = new_id()
        self._put(sid, data)
        return sid

    def load(self, sid):
        blob = self.client.get(self.prefix + sid)
        if blob is None:
            data = {}
        elif self.pickled:
            import pickle
            data = pickle.loads(blob)
        else:
            data = json.loads(blob)
        handle = Loaded(data)
        handle.sid = sid
        return handle

    def save(self, handle):
        self._put(handle.sid, handle)

    def read(self, sid):
        return dict(self.load(sid))

    def close(self):
        self.client.connection_pool.disconnect()


def redis_benchmark(clients, requests=20_000):
    """redis-benchmark's GET and SET rates with ``clients`` connections and ~1 KB values on this
    benchmark's server: the server's own limit. Returns {"get": req/s, "set": req/s} or raises
    NotAvailable."""
    if not os.path.exists(REDIS_BENCHMARK):
        raise NotAvailable("no redis-benchmark (apt install redis-tools)")
    out = subprocess.run([REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(redis_port()), "-c", str(clients),
                          "-n", str(requests), "-d", "1000", "-t", "get,set", "--csv"],
                         capture_output=True, text=True, timeout=120)
    rates = {}
    for line in out.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) > 1 and cells[0] in ("GET", "SET"):
            rates[cells[0].lower()] = float(cells[1])
    if set(rates) != {"get", "set"}:
        raise NotAvailable("redis-benchmark printed no rates: %s" % (out.stderr or out.stdout)[-200:])
    return rates


def redis_benchmark_row(label, clients, width):
    """A table row: redis-benchmark's rate of GET+SET pairs (one request = one GET and one SET)."""
    try:
        rates = redis_benchmark(clients)
    except NotAvailable as exc:
        return ["redis-benchmark", "n/a (%s)" % exc], None
    pairs = 1 / (1 / rates["get"] + 1 / rates["set"])
    row = [label, "-", fmt_int(pairs)] + ["-"] * (width - 3)
    return row, {"get_per_s": rates["get"], "set_per_s": rates["set"], "pairs_per_s": pairs}


# --- sesskit (placeholder against the announced API) -----------------------

SESSKIT_CONTAINERS = ["file", "memory", "lmdb", "sqlite", "redis"]


def import_sesskit():
    """Import sesskit from SESSKIT_PATH, read-only: no .pyc is written
    there.  Raises NotAvailable when it is not there or does not import."""
    if SESSKIT_PATH not in sys.path:
        sys.path.insert(0, SESSKIT_PATH)
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        import sesskit
    except ImportError as exc:
        raise NotAvailable("sesskit not importable yet: %s" % exc)
    except Exception as exc:
        raise NotAvailable("sesskit import failed: %s" % describe_error(exc))
    finally:
        sys.dont_write_bytecode = previous
    return sesskit


def sesskit_url(container, directory):
    if container == "memory":
        return "memory:"
    if container == "file":
        return "file:" + os.path.join(directory, "store")
    if container == "lmdb":
        return "lmdb:" + os.path.join(directory, "store.lmdb")
    if container == "sqlite":
        return "sqlite:" + os.path.join(directory, "store.sqlite")
    if container == "redis":       # the benchmark's own server; a key prefix per store directory
        return "redis://127.0.0.1:%d/0?prefix=%s:" % (redis_port(), os.path.basename(directory))
    raise ValueError(container)


class SesskitAdapter(Adapter):
    """sesskit through its public API:

        store = sesskit.open_store("file:DIR")     # or memory:, lmdb:, sqlite:
        with sesskit.open_session(sid, store=store, lock="merge",
                                  timeout=SESSION_TTL) as s:
            s["k"] = "v"

    timeout=SESSION_TTL gives sesskit sessions the two-week lifetime the
    other systems get (sesskit's own default is 30 minutes, sliding).
    Sessions are made expired by reopening them with a clock set in the
    past and a 1-second timeout (open_session's `clock` argument);
    reaping is store.reap(), and store.last_reap_visited when it exists.
    durable=True is the file container's fsync-every-write option (row
    'sesskit-file-durable', to compare with the peers that fsync)."""

    import_module = "sesskit"

    #: store options of each row variant: the durable rows fsync every write (compare them with the
    #: peers and raw rows that fsync); nosync is LMDB without any fsync (compare with raw-lmdb-nosync).
    VARIANTS = {None: {}, "durable": {"durable": True}, "nosync": {"sync": False, "metasync": False}}

    def __init__(self, directory, fresh, container, lock="merge", variant=None):
        super().__init__(directory, fresh)
        self.sesskit = import_sesskit()
        self.container = container
        self.lock = lock
        self.name = "sesskit-" + container + ("-" + variant if variant else "")
        self.shared_across_processes = container != "memory"
        self.file_per_session = container == "file"
        self.url = sesskit_url(container, directory)
        self.store_options = dict(self.VARIANTS[variant])
        try:
            self.store = self.sesskit.open_store(self.url, **self.store_options)
        except Exception as exc:
            reason = describe_error(exc).replace(directory, "DIR")
            raise NotAvailable("open_store('%s:...') raised %s" % (container, reason))

    def open(self, sid, lock=None):
        return self.sesskit.open_session(sid, store=self.store,
                                         lock=lock or self.lock,
                                         timeout=SESSION_TTL)

    def create(self, data):
        with self.open(None) as session:
            for key, value in data.items():
                session[key] = value
        return session.id

    def request(self, sid, key, value):
        with self.open(sid) as session:
            session[key] = value

    def load(self, sid):
        return HeldContext(self.open(sid))

    def save(self, handle):
        handle.leave()

    def read(self, sid):
        with self.open(sid, lock="read") as session:
            return dict(session)

    def expire(self, sids):
        past = time.time() - BACKDATE
        for sid in sids:
            with self.sesskit.open_session(sid, store=self.store, clock=lambda: past,
                                           reap_interval=0) as session:
                session.timeout = 1

    def reap(self):
        removed = self.store.reap()
        visited = getattr(self.store, "last_reap_visited", None)
        if visited is None:
            return "~%d (removed)" % removed
        return "%d (counted by sesskit)" % visited

    def close(self):
        self.store.close()

    def cold_snippet(self, sid):
        if self.container == "memory":
            raise NotAvailable("memory store does not outlive its process")
        return (
            "import sys\n"
            "import sesskit\n"
            "store = sesskit.open_store(%r, **%r)\n"
            "with sesskit.open_session(%r, store=store, lock=%r, timeout=%d) as s:\n"
            "    s['cold'] = sys.argv[1]\n" % (self.url, self.store_options, sid,
                                            self.lock, SESSION_TTL)
        )

    def cold_env(self):
        return {"PYTHONPATH": sesskit_cold_copy()}


def sesskit_cold_copy():
    """A copy of sesskit.py under RUN_ROOT with its .pyc compiled next to
    it, for the cold processes: the peers' .pyc files were written by pip,
    so sesskit gets one too, without writing anything into SESSKIT_PATH
    (PYTHONDONTWRITEBYTECODE may be set, and the repo is read-only here)."""
    import py_compile
    folder = os.path.join(RUN_ROOT, "sesskit-copy")
    target = os.path.join(folder, "sesskit.py")
    if not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        shutil.copy2(os.path.join(SESSKIT_PATH, "sesskit.py"), target)
        py_compile.compile(target, doraise=True)
    return folder


# --- Registry --------------------------------------------------------------

# name -> factory(directory, fresh, **options) returning an Adapter.
# Peers first, then the raw limits of each medium, then sesskit.
SYSTEMS = {
    "beaker-file": lambda d, f, **o: BeakerAdapter(d, f, "file"),
    "beaker-dbm": lambda d, f, **o: BeakerAdapter(d, f, "dbm"),
    "cachelib-file": lambda d, f, **o: CachelibAdapter(d, f),
    "diskcache": lambda d, f, **o: DiskcacheAdapter(d, f),
    "diskcache-tx": lambda d, f, **o: DiskcacheAdapter(d, f, transact=True),
    "django-file": lambda d, f, **o: DjangoFileAdapter(d, f),
    "django-db": lambda d, f, **o: DjangoDbAdapter(d, f),
    "raw-lmdb-sync": lambda d, f, **o: RawLmdbAdapter(d, f, sync=True),
    "raw-lmdb-nosync": lambda d, f, **o: RawLmdbAdapter(d, f, sync=False),
    "raw-file-fsync": lambda d, f, **o: RawFileAdapter(d, f, fsync=True),
    "raw-file-nofsync": lambda d, f, **o: RawFileAdapter(d, f, fsync=False),
    "raw-sqlite-wal": lambda d, f, **o: RawSqliteAdapter(d, f),
    "sesskit-file": lambda d, f, **o: SesskitAdapter(d, f, "file", **o),
    "sesskit-file-durable": lambda d, f, **o: SesskitAdapter(d, f, "file", variant="durable", **o),
    "sesskit-memory": lambda d, f, **o: SesskitAdapter(d, f, "memory", **o),
    "sesskit-lmdb": lambda d, f, **o: SesskitAdapter(d, f, "lmdb", **o),
    "sesskit-lmdb-durable": lambda d, f, **o: SesskitAdapter(d, f, "lmdb", variant="durable", **o),
    "sesskit-lmdb-nosync": lambda d, f, **o: SesskitAdapter(d, f, "lmdb", variant="nosync", **o),
    "sesskit-sqlite": lambda d, f, **o: SesskitAdapter(d, f, "sqlite", **o),
    "flask-session-redis": lambda d, f, **o: RedisPlainAdapter(d, f, pickled=True),
    "raw-redis-getset": lambda d, f, **o: RedisPlainAdapter(d, f, pickled=False),
    "sesskit-redis": lambda d, f, **o: SesskitAdapter(d, f, "redis", **o),
}


def make_adapter(spec, fresh):
    """spec = (system name, directory, options): picklable, so a child
    process can build its own adapter from it after fork."""
    name, directory, options = spec
    return SYSTEMS[name](directory, fresh, **options)


def select_systems(only):
    """--only a,b: exact names, or a family prefix ('sesskit', 'raw-lmdb')."""
    if not only:
        return list(SYSTEMS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [name for name in SYSTEMS
              if any(name == w or name.startswith(w + "-") for w in wanted)]
    unknown = [w for w in wanted
               if not any(n == w or n.startswith(w + "-") for n in SYSTEMS)]
    if unknown:
        sys.exit("unknown system(s): %s; known: %s" % (
            ", ".join(unknown), ", ".join(SYSTEMS)))
    return chosen


def ratio_cells(results, name, figure, higher_is_better):
    """One 'sesskit ratio' cell per sesskit container for this row.

    results: {system name: figures dict}; figure: key in figures.  A ratio
    above 1 means the sesskit container did better than row `name`."""
    cells = []
    mine = results.get(name, {}).get(figure)
    for container in SESSKIT_CONTAINERS:
        theirs = results.get("sesskit-" + container, {}).get(figure)
        if not mine or not theirs:
            cells.append("-")
        elif higher_is_better:
            cells.append(fmt_ratio(theirs / mine))
        else:
            cells.append(fmt_ratio(mine / theirs))
    return cells


RATIO_HEADERS = ["sk-" + c for c in SESSKIT_CONTAINERS]


def run_guarded(name, body):
    """Run body() for one system; turn NotAvailable or any error into an
    {'na': reason} or {'error': text} result instead of stopping the run."""
    try:
        return body()
    except NotAvailable as exc:
        return {"na": str(exc)}
    except Exception as exc:
        return {"error": describe_error(exc)}


def short_row(name, result):
    if "na" in result:
        return [name, "n/a (%s)" % result["na"]]
    return [name, "error (%s)" % result["error"]]


# ===========================================================================
# 4. Scenarios
# ===========================================================================

# --- Scenario 1: request cycle, one process --------------------------------

def scenario_request_cycle(names, sizes):
    """2,000 sessions, 20,000 requests: each loads a random session,
    changes one key, saves.  The same request list for every system."""
    rng = random.Random(SEED + 1)
    n_sessions = sizes["s1_sessions"]
    total = sizes["s1_warmup"] + sizes["s1_requests"]
    workload = [(rng.randrange(n_sessions),
                 "k%02d" % rng.randrange(KEYS_PER_SESSION),
                 random_string(rng)) for _ in range(total)]

    results = {}
    for name in names:
        results[name] = run_guarded(name, lambda: _request_cycle_one(
            name, n_sessions, workload, sizes["s1_warmup"], sizes["s1_budget_s"]))

    rows = []
    for name in names:
        r = results[name]
        if "na" in r or "error" in r:
            rows.append(short_row(name, r))
            continue
        capped = "*" if r["requests"] < sizes["s1_requests"] else ""
        rows.append([name, fmt_int(r["requests"]) + capped,
                     fmt_int(r["requests_per_s"]), fmt_int(r["p50_us"]),
                     fmt_int(r["p99_us"])]
                    + ratio_cells(results, name, "requests_per_s", True))
    if any("redis" in name for name in names):
        row, figures = redis_benchmark_row("redis-benchmark GET+SET, 1 client", 1, len(rows[0]))
        rows.append(row)
        if figures:
            results["redis-benchmark"] = figures
    print_table(
        "Scenario 1: request cycle, one process (%d sessions of ~1 KB, %d requests)"
        % (n_sessions, sizes["s1_requests"]),
        ["system", "requests", "req/s", "p50 us", "p99 us"] + RATIO_HEADERS, rows,
        ["* = stopped by the %d s time budget before all requests ran." % sizes["s1_budget_s"],
         "sk-X = sesskit-X req/s / this row's req/s (>1: sesskit faster)."])
    return results


def _request_cycle_one(name, n_sessions, workload, warmup, budget_s):
    directory = fresh_dir(name)
    adapter = None
    try:
        adapter = make_adapter((name, directory, {}), fresh=True)
        ids = adapter.setup(n_sessions)
        for index, key, value in workload[:warmup]:
            adapter.request(ids[index], key, value)
        latencies = []
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + budget_s * 1e9
        for index, key, value in workload[warmup:]:
            t0 = clock()
            adapter.request(ids[index], key, value)
            t1 = clock()
            latencies.append(t1 - t0)
            if t1 > deadline:
                break
        elapsed = (clock() - start) / 1e9
        # sanity: the last write must be readable
        if adapter.read(ids[index]).get(key) != value:
            raise RuntimeError("last write not read back")
        return {
            "requests": len(latencies),
            "requests_per_s": len(latencies) / elapsed,
            "p50_us": percentile(latencies, 0.50) / 1000,
            "p99_us": percentile(latencies, 0.99) / 1000,
        }
    finally:
        if adapter is not None:
            adapter.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- Scenario 2: one hot session, concurrent writers -----------------------

def hot_loop(adapter, sid, worker_no, n_requests, budget_s, barrier):
    """One worker's requests: each adds its own key w<worker>_<i>; stops
    early after budget_s seconds.
    Returns (start, end, succeeded, failed, first error text)."""
    succeeded = failed = 0
    first_error = None
    barrier.wait(timeout=60)
    start = time.perf_counter()
    deadline = start + budget_s
    for i in range(n_requests):
        if time.perf_counter() > deadline:
            break
        try:
            adapter.request(sid, "w%d_%d" % (worker_no, i), "1")
            succeeded += 1
        except Exception as exc:
            failed += 1
            if first_error is None:
                first_error = describe_error(exc)
    end = time.perf_counter()
    return start, end, succeeded, failed, first_error


def hot_process_main(spec, sid, worker_no, n_requests, budget_s, barrier, out):
    """Entry point of a forked worker: builds its own adapter (stores are
    created after fork), runs hot_loop, reports through the queue."""
    try:
        adapter = make_adapter(spec, fresh=False)
    except Exception as exc:
        barrier.abort()
        out.put((worker_no, None, None, 0, n_requests, describe_error(exc)))
        return
    try:
        out.put((worker_no,) + hot_loop(adapter, sid, worker_no, n_requests,
                                        budget_s, barrier))
    except Exception as exc:
        out.put((worker_no, None, None, 0, n_requests, describe_error(exc)))
    finally:
        adapter.close()


def run_hot_processes(spec, sid, workers, n_requests, budget_s):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(workers)
    out = context.Queue()
    processes = [context.Process(target=hot_process_main,
                                 args=(spec, sid, w, n_requests, budget_s,
                                       barrier, out))
                 for w in range(workers)]
    for p in processes:
        p.start()
    reports = []
    deadline = time.monotonic() + WORKER_TIMEOUT
    try:
        for _ in processes:
            reports.append(out.get(timeout=max(1, deadline - time.monotonic())))
    except queue.Empty:
        pass
    for p in processes:
        p.join(timeout=max(1, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join()
    if len(reports) < workers:
        raise RuntimeError("%d of %d workers did not report within %ds"
                           % (workers - len(reports), workers, WORKER_TIMEOUT))
    return reports


def run_hot_threads(adapter, sid, workers, n_requests, budget_s):
    barrier = threading.Barrier(workers)
    reports = [None] * workers

    def thread_main(worker_no):
        try:
            reports[worker_no] = (worker_no,) + hot_loop(
                adapter, sid, worker_no, n_requests, budget_s, barrier)
        except Exception as exc:
            barrier.abort()
            reports[worker_no] = (worker_no, None, None, 0, n_requests,
                                  describe_error(exc))

    threads = [threading.Thread(target=thread_main, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WORKER_TIMEOUT)
    if any(t.is_alive() for t in threads):
        raise RuntimeError("threads still running after %ds" % WORKER_TIMEOUT)
    return reports


def _hot_one(name, options, mode, sizes):
    """One system in one mode ('procs' or 'threads')."""
    workers, n_requests = sizes["s2_workers"], sizes["s2_requests"]
    budget_s = sizes["s2_budget_s"]
    directory = fresh_dir(name)
    spec = (name, directory, options)
    adapter = None
    try:
        adapter = make_adapter(spec, fresh=True)
        sid = adapter.create(session_data(0))
        if mode == "procs":
            if not adapter.shared_across_processes:
                raise NotAvailable("store is private to one process")
            adapter.close()          # nothing open may cross the fork
            adapter = None
            reports = run_hot_processes(spec, sid, workers, n_requests, budget_s)
            adapter = make_adapter(spec, fresh=False)
        else:
            reports = run_hot_threads(adapter, sid, workers, n_requests, budget_s)
        starts = [r[1] for r in reports if r[1] is not None]
        ends = [r[2] for r in reports if r[2] is not None]
        succeeded = sum(r[3] for r in reports)
        failed = sum(r[4] for r in reports)
        errors = [r[5] for r in reports if r[5]]
        if not starts:
            raise RuntimeError(errors[0] if errors else "no worker ran")
        final = adapter.read(sid)
        present = sum(1 for k in final if k.startswith("w"))
        wall = max(ends) - min(starts)
        return {
            "requests": succeeded + failed,
            "requests_per_s": (succeeded + failed) / wall,
            "failed": failed,
            "expected_keys": workers * n_requests,
            "succeeded": succeeded,
            "present_keys": present,
            "lost_keys": succeeded - present,
            "first_error": errors[0] if errors else None,
        }
    finally:
        if adapter is not None:
            adapter.close()
        shutil.rmtree(directory, ignore_errors=True)


def scenario_hot_session(names, sizes):
    """8 processes (then 8 threads) each add 300 distinct keys to one
    session through load-modify-save.  sesskit containers run with both
    lock='merge' (the ratio basis) and lock='exclusive'."""
    variants = []   # (row label, system name, options)
    for name in names:
        if name.startswith("sesskit-"):
            variants.append((name, name, {"lock": "merge"}))
            variants.append((name + "[excl]", name, {"lock": "exclusive"}))
        else:
            variants.append((name, name, {}))

    results = {"procs": {}, "threads": {}}
    for mode in ("procs", "threads"):
        for label, name, options in variants:
            results[mode][label] = run_guarded(
                label, lambda: _hot_one(name, options, mode, sizes))

    rows = []
    for label, _name, _options in variants:
        for mode in ("procs", "threads"):
            r = results[mode][label]
            row_name = "%s %s" % (label, mode)
            if "na" in r or "error" in r:
                rows.append(short_row(row_name, r))
                continue
            capped = "*" if r["requests"] < r["expected_keys"] else ""
            rows.append([row_name, fmt_int(r["requests"]) + capped,
                         fmt_int(r["requests_per_s"]), fmt_int(r["failed"]),
                         "%d/%d" % (r["lost_keys"], r["succeeded"])]
                        + ratio_cells(results[mode], label, "requests_per_s", True))
    workers = sizes["s2_workers"]
    if any("redis" in name for name in names):
        row, figures = redis_benchmark_row("redis-benchmark GET+SET, %d clients" % workers, workers,
                                           len(rows[0]))
        rows.append(row)
        if figures:
            results["redis-benchmark"] = figures
    print_table(
        "Scenario 2: one hot session, %d workers x %d requests, each adding its own key"
        % (workers, sizes["s2_requests"]),
        ["system mode", "requests", "req/s", "failed", "lost keys"] + RATIO_HEADERS, rows,
        ["* = workers stopped by the %d s time budget before all requests ran." % sizes["s2_budget_s"],
         "lost keys = keys whose save succeeded but are missing at the end / saves that succeeded.",
         "sk-X = sesskit-X (lock=merge) req/s / this row's req/s, same mode (>1: sesskit faster).",
         "Throughput of a store that loses keys is not comparable to one that keeps them."])
    for mode in ("procs", "threads"):
        for label, r in results[mode].items():
            if r.get("first_error"):
                print("  first failure of %s %s: %s" % (label, mode, r["first_error"]))
    return results


# --- Scenario 3: scale -----------------------------------------------------

def scenario_scale(names, sizes, big):
    """Create N sessions (timed), time loads and saves at that size, make 1%
    expired, reap (timed)."""
    results = {}
    for name in names:
        results[name] = run_guarded(name, lambda: _scale_one(name, sizes, big))

    rows = []
    for name in names:
        r = results[name]
        if "na" in r or "error" in r:
            rows.append(short_row(name, r))
            continue
        ratios = []
        for container in SESSKIT_CONTAINERS:
            mine = results.get("sesskit-" + container, {})
            if not mine.get("create_per_s"):
                ratios.append("-")
                continue
            create = fmt_ratio(mine["create_per_s"] / r["create_per_s"])
            reap = (fmt_ratio(r["reap_s"] / mine["reap_s"])
                    if mine.get("reap_s") and r.get("reap_s") else "-")
            ratios.append(create + "/" + reap)
        capped = "*" if r["sessions"] < r["target"] else ""
        rows.append([name, fmt_int(r["sessions"]) + capped, fmt_int(r["create_per_s"]),
                     fmt_int(r["p50_load_us"]), fmt_int(r["p50_save_us"]),
                     fmt_int(r.get("expired")), fmt_float(r.get("reap_s"), 3),
                     r.get("reap_visited") or "-", r.get("reap_check", "-")]
                    + ratios)
    print_table(
        "Scenario 3: scale (%s sessions%s), 1%% made expired then reaped"
        % (fmt_int(sizes["s3_big"] if big else sizes["s3_sessions"]),
           "; file-per-session stores at %s" % fmt_int(sizes["s3_sessions"]) if big else ""),
        ["system", "sessions", "create/s", "p50 load us", "p50 save us", "expired",
         "reap s", "visited", "check"] + RATIO_HEADERS, rows,
        ["* = creation stopped by the %d s time budget: the store holds fewer sessions." % sizes["s3_budget_s"],
         "p50 load = open/read one session (for lmdb/sqlite raw rows: inside the write txn);",
         "p50 save = set one key + write back.  visited: 'every file/entry' is counted by this",
         "script or read off the reaper's code; '~N (index)' means an indexed delete touched ~N rows.",
         "check: expired sessions gone and live ones still there after the reap.",
         "sk-X = create/s ratio / reap-time ratio of sesskit-X vs this row (>1: sesskit better);",
         "rows stopped by the budget hold fewer sessions, so compare those ratios with care."])
    return results


def _scale_one(name, sizes, big):
    directory = fresh_dir(name)
    adapter = None
    try:
        adapter = make_adapter((name, directory, {}), fresh=True)
        n = sizes["s3_sessions"]
        if big and not adapter.file_per_session:
            n = sizes["s3_big"]
        target = n
        rng = random.Random(SEED + 3)

        # Like setup(n), but stopped by the time budget: a slow store ends
        # up smaller, and the table says so.
        ids = []
        start = time.perf_counter()
        deadline = start + sizes["s3_budget_s"]
        for i in range(n):
            ids.append(adapter.create(session_data(i)))
            if time.perf_counter() > deadline:
                break
        create_s = time.perf_counter() - start
        n = len(ids)

        loads, saves = [], []
        clock = time.perf_counter_ns
        for sid in rng.sample(ids, min(sizes["s3_samples"], n)):
            t0 = clock()
            handle = adapter.load(sid)
            t1 = clock()
            handle["k01"] = random_string(rng)
            adapter.save(handle)
            t2 = clock()
            loads.append(t1 - t0)
            saves.append(t2 - t1)
        result = {
            "target": target,
            "sessions": n,
            "create_s": create_s,
            "create_per_s": n / create_s,
            "p50_load_us": percentile(loads, 0.5) / 1000,
            "p50_save_us": percentile(saves, 0.5) / 1000,
        }

        expired = rng.sample(ids, int(n * EXPIRED_FRACTION))
        try:
            adapter.expire(expired)
            start = time.perf_counter()
            visited = adapter.reap()
            result["reap_s"] = time.perf_counter() - start
        except NotAvailable as exc:
            result["reap_visited"] = "n/a: " + str(exc)
            return result
        result["expired"] = len(expired)
        result["reap_visited"] = visited
        gone = {sid for sid in expired}
        live = [sid for sid in rng.sample(ids, 50) if sid not in gone][:20]
        expired_left = sum(1 for sid in expired[:20] if adapter.read(sid))
        live_missing = sum(1 for sid in live if not adapter.read(sid))
        result["reap_check"] = "ok" if expired_left == live_missing == 0 else (
            "FAIL %d left %d lost" % (expired_left, live_missing))
        return result
    finally:
        if adapter is not None:
            adapter.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- Scenario 4: cold process ----------------------------------------------

def run_cold(code, value, extra_env):
    """Wall time (ms) of one `python -c code value`, fork/exec/wait included."""
    env = dict(os.environ)
    env.update(extra_env)
    start = time.perf_counter()
    # cwd: the run's temp dir, never the repo, whose uncompiled sesskit.py would shadow the compiled copy
    proc = subprocess.run([sys.executable, "-c", code, value], env=env, cwd=RUN_ROOT,
                          capture_output=True, text=True, timeout=COLD_TIMEOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        raise RuntimeError("cold process failed: " + last[:150])
    return elapsed * 1000


def import_time_us(module, runs, extra_env):
    """Cost of `import module` per `python -X importtime`: the cumulative
    microseconds of every top-level import that a bare interpreter does not
    do anyway (for `import a.b`, both `a` and `a.b`).  Median of runs."""
    env = dict(os.environ)
    env.update(extra_env)

    def top_level(code):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                              env=env, cwd=RUN_ROOT, capture_output=True, text=True,
                              timeout=COLD_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError("import %s failed" % module)
        entries = {}
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "imported package" in line:
                continue
            _self, cumulative, name = line[len("import time:"):].split("|")
            if not name.startswith(" ") or name.startswith("  "):
                continue    # nested import: already inside a parent's figure
            entries[name.strip()] = int(cumulative)
        return entries

    baseline = set(top_level("pass"))
    totals = []
    for _ in range(runs):
        entries = top_level("import " + module)
        totals.append(sum(us for name, us in entries.items() if name not in baseline))
    return statistics.median(totals)


BARE = "python -c pass"
FLOOR = "raw floor (json file)"


def scenario_cold(names, sizes):
    """Whole new interpreters: bare start-up, the raw floor, then each
    system opening one existing session, setting a key and saving.

    Runs go round-robin (one warm-up round, then each round runs every
    entry once) so that drifting machine load hits all entries alike."""
    runs = sizes["s4_runs"]
    it_runs = sizes["s4_importtime_runs"]
    labels = [BARE, FLOOR] + list(names)
    results = {}
    prepared = {BARE: {"code": "pass", "env": {}, "module": None, "spec": None}}
    # The raw floor is raw-file-nofsync's snippet: import json, read the
    # session file, write it back through a temp file and os.replace.
    for label, name in [(FLOOR, "raw-file-nofsync")] + [(n, n) for n in names]:
        entry = run_guarded(label, lambda: _cold_prepare(name))
        if "code" in entry:
            prepared[label] = entry
        else:
            results[label] = entry

    times = {label: [] for label in prepared}
    for round_no in range(runs + 1):
        for label in list(prepared):
            entry = prepared[label]
            try:
                elapsed = run_cold(entry["code"], "run%d" % round_no, entry["env"])
            except Exception as exc:
                results[label] = {"error": describe_error(exc)}
                _cold_cleanup(prepared.pop(label))
                continue
            if round_no > 0:                 # round 0 is the warm-up
                times[label].append(elapsed)

    for label, entry in prepared.items():
        results[label] = run_guarded(label, lambda: _cold_finish(
            entry, times[label], "run%d" % runs, it_runs))

    bare = results[BARE].get("median_ms")
    rows = []
    for label in labels:
        r = results[label]
        if "na" in r or "error" in r:
            rows.append(short_row(label, r))
            continue
        over = r["median_ms"] - bare if bare else None
        rows.append([label, fmt_float(r["median_ms"]), fmt_float(over),
                     r.get("import_module") or "-", fmt_int(r.get("import_us"))]
                    + ratio_cells(results, label, "median_ms", False))
    print_table(
        "Scenario 4: cold process: new interpreter opens one session, sets a key, saves (median of %d)"
        % runs,
        ["system", "median ms", "over bare", "module (-X importtime)", "import us"]
        + RATIO_HEADERS, rows,
        ["over bare = median minus bare interpreter start-up (negative = within the noise).",
         "import us = cumulative us of `import module` in a fresh interpreter (median of %d)." % it_runs,
         "sk-X = this row's ms / sesskit-X ms (>1: sesskit faster)."])
    return results


def _cold_prepare(name):
    """Make a store holding one session; return what the cold runs need."""
    directory = fresh_dir(name)
    spec = (name, directory, {})
    adapter = None
    try:
        adapter = make_adapter(spec, fresh=True)
        sid = adapter.create(session_data(0))
        entry = {"code": adapter.cold_snippet(sid), "env": adapter.cold_env(),
                 "module": adapter.import_module, "spec": spec, "sid": sid}
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        if adapter is not None:
            adapter.close()          # the child must be able to take locks
    return entry


def _cold_finish(entry, times, last_value, it_runs):
    """Check the last cold run's write is there; measure the import time."""
    try:
        result = {"median_ms": statistics.median(times), "runs": len(times),
                  "import_module": entry["module"]}
        if entry["spec"] is not None:
            adapter = make_adapter(entry["spec"], fresh=False)
            try:
                found = adapter.read(entry["sid"]).get("cold")
            finally:
                adapter.close()
            if found != last_value:
                raise RuntimeError("cold write not found afterwards (%r)" % found)
        if entry["module"]:
            result["import_us"] = import_time_us(entry["module"], it_runs, entry["env"])
        return result
    finally:
        _cold_cleanup(entry)


def _cold_cleanup(entry):
    if entry["spec"] is not None:
        shutil.rmtree(entry["spec"][1], ignore_errors=True)


# ===========================================================================
# 5. Main
# ===========================================================================

PEER_DISTRIBUTIONS = ["beaker", "cachelib", "diskcache", "django", "lmdb", "redis"]


def versions():
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for dist in PEER_DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    try:
        sesskit = import_sesskit()
        found["sesskit"] = getattr(sesskit, "__version__", "present (no __version__)")
    except NotAvailable as exc:
        found["sesskit"] = "n/a (%s)" % exc
    return found


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every size ~10x smaller; whole run < 1 minute")
    parser.add_argument("--big", action="store_true",
                        help="scenario 3 with 1,000,000 sessions where the store is not file-per-session")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated systems or families, e.g. sesskit,raw-lmdb,django-db")
    parser.add_argument("--scenarios", default="1,2,3,4",
                        help="which scenarios to run (default 1,2,3,4)")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    return parser.parse_args(argv)


def main(argv=None):
    global RUN_ROOT
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    names = select_systems(args.only)
    scenarios = {s.strip() for s in args.scenarios.split(",")}

    RUN_ROOT = tempfile.mkdtemp(prefix="bench-sesskit-")
    sys.stdout.reconfigure(line_buffering=True)     # tables appear as they are done, also in a log file
    run_start = time.perf_counter()
    found = versions()
    print("bench_sesskit: %s mode%s, %d CPUs, load average %.2f, %s" % (
        "quick" if args.quick else "full", " --big" if args.big else "",
        os.cpu_count(), os.getloadavg()[0], platform.platform()))
    print("versions: " + ", ".join("%s %s" % kv for kv in found.items()))
    print("systems: " + ", ".join(names))
    sys.stdout.flush()

    report = {"meta": {"versions": found, "sizes": sizes, "quick": args.quick,
                       "big": args.big, "systems": names,
                       "cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_average_at_start": os.getloadavg()}}
    timings = {}
    try:
        steps = [("1", "s1_request_cycle", lambda: scenario_request_cycle(names, sizes)),
                 ("2", "s2_hot_session", lambda: scenario_hot_session(names, sizes)),
                 ("3", "s3_scale", lambda: scenario_scale(names, sizes, args.big)),
                 ("4", "s4_cold_process", lambda: scenario_cold(names, sizes))]
        for number, key, run in steps:
            if number not in scenarios:
                continue
            start = time.perf_counter()
            report[key] = run()
            timings[key] = time.perf_counter() - start
            print("  (scenario %s took %.1f s)" % (number, timings[key]))
    finally:
        stop_redis()
        shutil.rmtree(RUN_ROOT, ignore_errors=True)

    total = time.perf_counter() - run_start
    report["meta"]["scenario_seconds"] = timings
    report["meta"]["total_seconds"] = total
    report["meta"]["load_average_at_end"] = os.getloadavg()
    print("\ntotal run time: %.1f s (load average now %.2f %.2f %.2f)"
          % ((total,) + os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        print("figures written to " + args.json)


if __name__ == "__main__":
    main()
