"""Tests of sesskit, in the module's order. Run: python -m pytest

Integration tests that need a server, a package or root privileges skip when those are missing, except
under SESSKIT_REQUIRE_INTEGRATION=1 (set by .ci/run), where a missing piece fails the run instead.
"""

import contextlib
import errno
import json
import multiprocessing
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from hypothesis.stateful import RuleBasedStateMachine, rule, invariant, initialize, precondition

import sesskit

REQUIRE_INTEGRATION = os.environ.get("SESSKIT_REQUIRE_INTEGRATION") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
T0 = 1_700_000_000.0


def _need(condition, reason):
    """Skip when ``condition`` is false, or fail when integration tests are required (CI)."""
    if not condition:
        if REQUIRE_INTEGRATION:
            pytest.fail(f"required for this test: {reason}")
        pytest.skip(reason)


class FakeClock:
    """An injectable wall clock for expiry tests."""

    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class ExThread(threading.Thread):
    """A thread that re-raises its target's exception on join()."""

    def run(self):
        self.error = None
        try:
            super().run()
        except BaseException as exc:  # re-raised in join
            self.error = exc

    def join(self, timeout=60):
        super().join(timeout)
        assert not self.is_alive(), "worker thread did not finish"
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def _processes(ctx, target, args_list):
    """Start one process per args tuple; on the way out terminate, join, kill and close every one."""
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(10)
            p.close()


def _run_all(ctx, target, args_list, timeout=120):
    with _processes(ctx, target, args_list) as procs:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), f"worker exit codes: {codes}"


# -- container fixtures ------------------------------------------------------------

CONTAINER_KINDS = ["memory", "file", "sqlite", "lmdb"]
SHARED_KINDS = ["file", "sqlite", "lmdb"]     # containers that several processes can share


def _have_lmdb():
    try:
        import lmdb  # noqa: F401
    except ImportError:
        return False
    return True


def _need_kind(kind):
    """Skip (or, under SESSKIT_REQUIRE_INTEGRATION=1, fail) when ``kind``'s package is missing."""
    if kind == "lmdb":
        _need(_have_lmdb(), "the lmdb package is not installed (pip install lmdb)")


def _store_url(kind, tmp_path):
    if kind == "memory":
        return "memory:"
    return f"{kind}:{tmp_path / ('store-' + kind)}"


@pytest.fixture(params=CONTAINER_KINDS)
def container(request, tmp_path):
    _need_kind(request.param)
    c = sesskit.open_store(_store_url(request.param, tmp_path))
    yield c
    c.close()


@pytest.fixture(params=SHARED_KINDS)
def shared_url(request, tmp_path):
    _need_kind(request.param)
    return _store_url(request.param, tmp_path)


def _seed(store, data, clock=None, **kw):
    kw.setdefault("reap_interval", 0)
    with sesskit.open_session(None, store=store, clock=clock, **kw) as s:
        s.update(data)
    assert s.saved
    return s.id


def _stored(store, sid, clock=None):
    """The stored data of ``sid`` as a dict, or None if it does not load."""
    record = sesskit.open_store(store).load(sid)
    now = (clock or time.time)()
    if record is None or record.expires < now:
        return None
    return json.loads(record.data)


###############################################################################
# Session ids
###############################################################################


class TestSessionId:
    def test_format(self):
        sid = sesskit.new_session_id()
        assert len(sid) == sesskit.SID_LENGTH == 44
        assert set(sid) <= set(sesskit._SID_ALPHABET)
        assert sesskit.is_valid_session_id(sid)

    def test_embeds_time_host_pid_counter(self):
        import base64
        a, b = sesskit.new_session_id(), sesskit.new_session_id()
        raw_a = base64.urlsafe_b64decode(a)
        raw_b = base64.urlsafe_b64decode(b)
        assert len(raw_a) == 33
        ms = int.from_bytes(raw_a[18:24], "big")
        assert abs(ms / 1000 - time.time()) < 5
        assert int.from_bytes(raw_a[27:30], "big") == os.getpid() & 0xFFFFFF
        assert raw_a[24:27] == raw_b[24:27]                       # same host tag
        assert os.uname().nodename.encode() not in raw_a
        assert int.from_bytes(raw_b[30:33], "big") == int.from_bytes(raw_a[30:33], "big") + 1
        assert raw_a[:18] != raw_b[:18]                           # fresh randomness

    def test_unique_across_threads(self):
        out = [[] for _ in range(8)]
        threads = [ExThread(target=lambda o=o: o.extend(sesskit.new_session_id() for _ in range(5000)))
                   for o in out]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = [sid for o in out for sid in o]
        assert len(set(ids)) == len(ids) == 40000

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
    def test_unique_after_fork(self):
        sesskit.new_session_id()                       # the parent's counter is used before forking
        readers = []
        for _ in range(4):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:                               # child: write 2000 ids and leave at once
                os.close(r)
                data = "\n".join(sesskit.new_session_id() for _ in range(2000)).encode()
                with os.fdopen(w, "wb") as f:
                    f.write(data)
                os._exit(0)
            os.close(w)
            readers.append((pid, r))
        ids = [sesskit.new_session_id() for _ in range(2000)]
        for pid, r in readers:
            with os.fdopen(r, "rb") as f:
                ids.extend(f.read().decode().split("\n"))
            assert os.waitpid(pid, 0)[1] == 0
        assert len(ids) == 10000 and len(set(ids)) == 10000

    @given(st.text(max_size=60))
    def test_random_text_is_not_an_id(self, text):
        valid = sesskit.is_valid_session_id(text)
        assert valid == (len(text) == 44 and all(c in sesskit._SID_ALPHABET for c in text))

    @pytest.mark.parametrize("bad", [
        "../../etc/passwd", "../" * 15 + "x", "a\x00b" * 10, "x" * 10_000, "é" * 44,
        "A" * 43 + "\x00", "A" * 43 + "/", "A" * 43 + ".", "A" * 45, "", None, 12, b"A" * 44,
        "Ａ" * 44,   # full-width letters: str.isalnum() would accept these
    ])
    def test_hostile_ids_are_invalid(self, bad):
        assert not sesskit.is_valid_session_id(bad)
        with pytest.raises(sesskit.InvalidSessionId):
            sesskit._require_sid(bad)


###############################################################################
# Locking
###############################################################################


def _hold_lock(url, sid, locked, release, mode):
    store = sesskit.open_store(url)
    with sesskit.open_session(sid, store=store, lock="exclusive") as s:
        locked.set()
        if mode == "crash":
            time.sleep(60)                          # killed by the parent while holding the lock
        release.wait(30)
        s["holder"] = os.getpid()


class TestLocking:
    def test_lock_timeout_across_processes(self, tmp_path):
        url = _store_url("file", tmp_path)
        sid = _seed(url, {"a": 1})
        ctx = multiprocessing.get_context("spawn")
        locked, release = ctx.Event(), ctx.Event()
        with _processes(ctx, _hold_lock, [(url, sid, locked, release, "normal")]) as procs:
            assert locked.wait(30), "holder never locked"
            start = time.monotonic()
            with pytest.raises(sesskit.LockTimeout) as info:
                with sesskit.open_session(sid, store=url, lock="exclusive", lock_timeout=0.3):
                    pass
            waited = time.monotonic() - start
            assert 0.3 <= waited < 3, waited
            assert isinstance(info.value, TimeoutError)
            assert sid not in str(info.value)           # ids are credentials: never in messages
            # A merge-mode reader is not blocked by the held lock
            with sesskit.open_session(sid, store=url, lock="read") as s:
                assert s["a"] == 1
            release.set()
            procs[0].join(30)
            assert procs[0].exitcode == 0
        assert _stored(url, sid)["holder"] > 0

    def test_killed_holder_releases_lock(self, tmp_path):
        url = _store_url("file", tmp_path)
        sid = _seed(url, {"a": 1})
        ctx = multiprocessing.get_context("fork")
        locked, release = ctx.Event(), ctx.Event()
        with _processes(ctx, _hold_lock, [(url, sid, locked, release, "crash")]) as procs:
            assert locked.wait(30), "holder never locked"
            with pytest.raises(sesskit.LockTimeout):
                with sesskit.open_session(sid, store=url, lock="exclusive", lock_timeout=0):
                    pass
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].join(10)
            with sesskit.open_session(sid, store=url, lock="exclusive", lock_timeout=5) as s:
                s["after"] = True
        assert _stored(url, sid) == {"a": 1, "after": True}

    def test_threads_of_one_process_exclude_each_other(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        sid = _seed(store, {"n": 0})
        lock = store.lock(sid, 1)
        assert lock is not None
        got = []
        t = ExThread(target=lambda: got.append(store.lock(sid, 0.2)))
        with pytest.raises(sesskit.LockTimeout):
            t.start()
            t.join()
        lock.release()
        second = store.lock(sid, 0)
        assert second is not None
        second.release()

    def test_lock_of_unknown_session_creates_nothing(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        before = sorted(os.walk(store.path))
        assert store.lock(sesskit.new_session_id(), 1) is None
        assert sorted(os.walk(store.path)) == before

    def test_lock_follows_a_deleted_and_recreated_file(self, tmp_path):
        """A waiter that wins the lock of an unlinked inode retries on the current file."""
        store = sesskit.FileContainer(tmp_path / "s")
        sid = _seed(store, {"n": 0})
        first = store.lock(sid, 1)
        result = []
        t = ExThread(target=lambda: result.append(store.lock(sid, 10)))
        t.start()
        time.sleep(0.05)
        store.delete(sid, held=first)
        first.release()
        t.join()
        assert result == [None]                       # gone: nothing to lock, nothing recreated
        assert store.load(sid) is None


###############################################################################
# Container contract (every container)
###############################################################################


def _record(data, now=T0, timeout=100.0, **kw):
    return sesskit.Record(json.dumps(data), now, now + timeout, timeout, **kw)


class TestContainerContract:
    def test_create_load(self, container):
        sid = sesskit.new_session_id()
        assert container.load(sid) is None
        container.create(sid, _record({"a": [1, 2]}))
        rec = container.load(sid)
        assert json.loads(rec.data) == {"a": [1, 2]}
        assert (rec.created, rec.expires, rec.timeout, rec.max_age, rec.forward) == (T0, T0 + 100, 100, 0, None)
        with pytest.raises(sesskit.ContainerError):
            container.create(sid, _record({}))
        assert json.loads(container.load(sid).data) == {"a": [1, 2]}

    def test_update_merges_and_refuses_missing_or_expired(self, container):
        sid = sesskit.new_session_id()
        container.create(sid, _record({"a": 1, "b": 2}))
        meta = sesskit.Record(None, T0, T0 + 200, 150.0)
        assert container.update(sid, {"c": {"x": 1}}, ["a"], meta, T0 + 1)
        rec = container.load(sid)
        assert json.loads(rec.data) == {"b": 2, "c": {"x": 1}}
        assert (rec.expires, rec.timeout) == (T0 + 200, 150.0)
        assert not container.update(sesskit.new_session_id(), {"z": 1}, [], meta, T0)
        assert not container.update(sid, {"z": 1}, [], meta, T0 + 201)      # expired: not resurrected
        assert "z" not in json.loads(container.load(sid).data)

    def test_update_refuses_a_tombstone(self, container):
        sid, new = sesskit.new_session_id(), sesskit.new_session_id()
        container.create(sid, _record({"a": 1}))
        tomb = sesskit.Record(None, T0, T0 + 10, 10.0, 0.0, new)
        assert container.update(sid, {}, ["a"], tomb, T0)
        rec = container.load(sid)
        assert rec.forward == new and json.loads(rec.data) == {}
        assert not container.update(sid, {"b": 1}, [], sesskit.Record(None, T0, T0 + 9, 9.0), T0)

    def test_touch_and_delete(self, container):
        sid = sesskit.new_session_id()
        container.create(sid, _record({"a": 1}))
        container.touch(sid, T0 + 500)
        assert container.load(sid).expires == T0 + 500
        assert json.loads(container.load(sid).data) == {"a": 1}
        container.delete(sid)
        assert container.load(sid) is None
        container.delete(sid)                                   # deleting twice is fine
        container.touch(sid, T0 + 600)                          # touching the dead resurrects nothing
        assert container.load(sid) is None

    def test_lock_excludes_and_update_with_held_lock(self, container):
        sid = sesskit.new_session_id()
        container.create(sid, _record({"n": 1}))
        held = container.lock(sid, 1)
        with pytest.raises(sesskit.LockTimeout):
            container.lock(sid, 0)
        meta = sesskit.Record(None, T0, T0 + 100, 100.0)
        assert container.update(sid, {"n": 2}, [], meta, T0, held=held)
        held.release()
        assert json.loads(container.load(sid).data) == {"n": 2}
        assert container.lock(sesskit.new_session_id(), 0) is None

    def test_reap_count_sids(self, container):
        live = [sesskit.new_session_id() for _ in range(5)]
        dead = [sesskit.new_session_id() for _ in range(7)]
        for sid in live:
            container.create(sid, _record({"x": 1}, timeout=1000))
        for sid in dead:
            container.create(sid, _record({"x": 1}, timeout=10))
        now = T0 + 100
        assert container.count(now) == 5
        assert sorted(container.sids(now)) == sorted(live)
        assert container.reap(now) == 7
        assert container.reap(now) == 0
        assert container.count(T0) == 5
        assert all(container.load(sid) is None for sid in dead)
        assert all(container.load(sid) is not None for sid in live)

    def test_reap_interval_skips(self, container):
        sid = sesskit.new_session_id()
        container.create(sid, _record({}, timeout=1))
        assert container.reap(T0 + 5, interval=60) == 1
        other = sesskit.new_session_id()
        container.create(other, _record({}, now=T0 + 5, timeout=1))
        assert container.reap(T0 + 30, interval=60) == 0             # a reap ran 25 s ago
        assert container.reap(T0 + 70, interval=60) == 1

    def test_reap_skips_a_session_in_use(self, container):
        sid = sesskit.new_session_id()
        container.create(sid, _record({}, timeout=1))
        held = container.lock(sid, 1)
        assert container.reap(T0 + 5) == 0
        held.release()
        assert container.reap(T0 + 5) == 1

    def test_pickles_as_configuration(self, container):
        import pickle
        clone = pickle.loads(pickle.dumps(container))
        assert type(clone) is type(container)


###############################################################################
# Session semantics (every container)
###############################################################################


class TestSession:
    def test_new_then_load(self, container):
        clock = FakeClock()
        with sesskit.open_session(None, store=container, clock=clock) as s:
            assert s.is_new and len(s) == 0
            s["user"] = "alice"
            s["cart"] = [1, 2]
        assert s.saved and sesskit.is_valid_session_id(s.id)
        clock.advance(5)
        with sesskit.open_session(s.id, store=container, clock=clock) as t:
            assert not t.is_new and t.id == s.id
            assert dict(t) == {"user": "alice", "cart": [1, 2]}
            assert t.created == T0
            assert t.timeout == sesskit.DEFAULTS["timeout"]

    def test_empty_new_session_is_not_stored(self, container):
        with sesskit.open_session(None, store=container) as s:
            pass
        assert not s.saved and container.load(s.id) is None and container.count() == 0

    @pytest.mark.parametrize("lock", sesskit.LOCK_MODES)
    def test_unknown_or_malformed_id_is_never_adopted(self, container, lock):
        for incoming in [sesskit.new_session_id(), "../../etc/passwd", "x" * 10_000, "a\x00b", "é" * 44]:
            with sesskit.open_session(incoming, store=container, lock=lock) as s:
                assert s.is_new and s.id != incoming and sesskit.is_valid_session_id(s.id)
                if lock != "read":
                    s["k"] = 1
            assert container.load(s.id) is not None or lock == "read"
            if sesskit.is_valid_session_id(incoming):
                assert container.load(incoming) is None

    def test_exception_discards_changes_and_releases_locks(self, container):
        sid = _seed(container, {"a": 1})
        for lock in ("merge", "exclusive"):
            with pytest.raises(KeyError):
                with sesskit.open_session(sid, store=container, lock=lock) as s:
                    s["a"] = 2
                    s["b"] = 3
                    raise KeyError("boom")
            assert json.loads(container.load(sid).data) == {"a": 1}
            with sesskit.open_session(sid, store=container, lock="exclusive", lock_timeout=0) as s:
                assert dict(s) == {"a": 1}

    def test_merge_applies_only_changed_keys(self, container):
        sid = _seed(container, {"a": 1, "b": [1], "c": "x", "n": 1})
        first = sesskit.open_session(sid, store=container).__enter__()
        with sesskit.open_session(sid, store=container) as second:
            second["b"].append(2)             # in-place edit of a nested list is caught
            second["c"] = "y"
            second["n"] = 1.0                 # 1 -> 1.0 is a change in JSON
        first["a"] = 2
        del first["c"]
        first.__exit__(None, None, None)
        assert _stored(container, sid) == {"a": 2, "b": [1, 2], "n": 1.0}

    def test_unchanged_session_is_not_rewritten(self, container, monkeypatch):
        sid = _seed(container, {"a": 1, "n": 1.0, "t": True})
        calls = []
        monkeypatch.setattr(container, "update", lambda *a, **k: calls.append(a))
        with sesskit.open_session(sid, store=container) as s:
            s["a"] = 1
            s["n"] = 1.0
            assert s["t"] is True
        assert calls == [] and not s.saved

    def test_read_mode(self, container):
        sid = _seed(container, {"a": [1]})
        with sesskit.open_session(sid, store=container, lock="read") as s:
            with pytest.raises(sesskit.ReadOnlySession):
                s["a"] = 2
            with pytest.raises(TypeError):            # ReadOnlySession is also a TypeError
                del s["a"]
            with pytest.raises(sesskit.ReadOnlySession):
                s.delete()
            s["a"].append(2)                          # an in-place edit is not written back either
        assert _stored(container, sid) == {"a": [1]}

    def test_non_json_value_names_the_key(self, container):
        with sesskit.open_session(None, store=container) as s:
            with pytest.raises(TypeError, match="'when'"):
                s["when"] = object()
            with pytest.raises(TypeError, match="'nan'"):
                s["nan"] = float("nan")
            with pytest.raises(TypeError):
                s[1] = "int keys do not survive JSON"
            s["ok"] = {"x": 1}
        sid = s.id
        with pytest.raises(TypeError, match="'ok'"):
            with sesskit.open_session(sid, store=container) as s:
                s["ok"]["x"] = {1, 2}                 # slipped in through a nested edit
        assert _stored(container, sid) == {"ok": {"x": 1}}

    def test_too_large(self, container):
        sid = _seed(container, {"a": 1})
        with pytest.raises(sesskit.SessionTooLarge):
            with sesskit.open_session(sid, store=container, max_size=1000) as s:
                s["big"] = "x" * 2000
        assert _stored(container, sid) == {"a": 1}
        with pytest.raises(sesskit.SessionTooLarge):
            with sesskit.open_session(None, store=container) as s:
                s["big"] = "x" * (sesskit.DEFAULTS["max_size"] + 1)
        assert container.load(s.id) is None

    def test_large_session_round_trip(self, container):
        sid = _seed(container, {"a": 1})
        with sesskit.open_session(sid, store=container) as s:
            s["big"] = "é" * 100_000                   # outgrows the file's slots
        with sesskit.open_session(sid, store=container) as s:
            assert s["big"] == "é" * 100_000
            s["a"] = 2
        assert _stored(container, sid)["a"] == 2

    def test_delete_is_not_resurrected(self, container):
        sid = _seed(container, {"a": 1})
        late = sesskit.open_session(sid, store=container).__enter__()
        with sesskit.open_session(sid, store=container) as s:
            s.delete()
            assert s.deleted and s.is_new and s.id != sid and len(s) == 0
        assert not s.saved
        late["b"] = 2
        late.__exit__(None, None, None)
        assert late.lost and not late.saved
        assert container.load(sid) is None

    def test_delete_then_new_data_starts_a_new_session(self, container):
        sid = _seed(container, {"user": "alice"})
        with sesskit.open_session(sid, store=container, lock="exclusive") as s:
            s.delete()
            s["flash"] = "logged out"
        assert container.load(sid) is None
        assert _stored(container, s.id) == {"flash": "logged out"}

    def test_expiry_sliding_and_not_resurrected(self, container):
        clock = FakeClock()
        sid = _seed(container, {"a": 1}, clock=clock, timeout=100)
        clock.advance(90)
        with sesskit.open_session(sid, store=container, clock=clock) as s:
            assert not s.is_new                    # a read pushes expiry forward (touch)
        clock.advance(90)
        late = sesskit.open_session(sid, store=container, clock=clock).__enter__()
        assert not late.is_new
        clock.advance(101)
        late["b"] = 2
        late.__exit__(None, None, None)
        assert late.lost
        with sesskit.open_session(sid, store=container, clock=clock) as s:
            assert s.is_new and s.id != sid

    def test_touch_is_throttled_and_rewrites_no_data(self, container, monkeypatch):
        clock = FakeClock()
        sid = _seed(container, {"a": 1}, clock=clock, timeout=1000)
        touches, updates = [], []
        real_touch = container.touch
        monkeypatch.setattr(container, "touch", lambda *a: (touches.append(a), real_touch(*a)))
        monkeypatch.setattr(container, "update", lambda *a, **k: updates.append(a))
        for _ in range(5):                          # 5 reads within the touch interval (60 s)
            clock.advance(10)
            with sesskit.open_session(sid, store=container, clock=clock, lock="read") as s:
                s.get("a")
        assert touches == [(sid, T0 + 50 + 1000)] or len(touches) <= 1
        clock.advance(70)
        with sesskit.open_session(sid, store=container, clock=clock) as s:
            pass
        assert touches[-1] == (sid, clock.now + 1000)
        assert updates == []
        assert container.load(sid).expires == clock.now + 1000

    def test_max_age_is_absolute(self, container):
        clock = FakeClock()
        sid = _seed(container, {"a": 1}, clock=clock, timeout=100, max_age=150)
        for _ in range(3):
            clock.advance(60)
            with sesskit.open_session(sid, store=container, clock=clock) as s:
                if clock.now - T0 <= 150:
                    assert not s.is_new
                    s["n"] = clock.now
                else:
                    assert s.is_new

    def test_timeout_is_stored_with_the_session(self, container):
        clock = FakeClock()
        sid = _seed(container, {"a": 1}, clock=clock, timeout=100)
        with sesskit.open_session(sid, store=container, clock=clock, timeout=5) as s:
            assert s.timeout == 100                  # the stored one wins over the argument
            s.timeout = 1000
        clock.advance(500)
        with sesskit.open_session(sid, store=container, clock=clock) as s:
            assert not s.is_new and s.timeout == 1000

    def test_regenerate(self, container):
        sid = _seed(container, {"user": "bob"})
        with sesskit.open_session(sid, store=container) as s:
            s.regenerate()
            s["login"] = True
        assert s.id != sid and s.saved
        assert container.load(sid) is None
        assert _stored(container, s.id) == {"user": "bob", "login": True}
        with sesskit.open_session(sid, store=container) as old:
            assert old.is_new

    def test_regenerate_with_grace_forwards_in_flight_requests(self, container):
        clock = FakeClock()
        sid = _seed(container, {"user": "bob"}, clock=clock)
        in_flight = sesskit.open_session(sid, store=container, clock=clock).__enter__()
        with sesskit.open_session(sid, store=container, clock=clock) as s:
            assert s.regenerate(grace=30)
        new = s.id
        in_flight["ajax"] = 1                       # loaded before the rotation, saved after it
        in_flight.__exit__(None, None, None)
        assert in_flight.saved
        with sesskit.open_session(sid, store=container, clock=clock) as t:   # old cookie, in grace
            assert t.id == new and not t.is_new
            assert t.regenerate() is False           # a forwarded session cannot be rotated again
            t["second"] = 2
        assert _stored(container, new, clock) == {"user": "bob", "ajax": 1, "second": 2}
        clock.advance(31)
        with sesskit.open_session(sid, store=container, clock=clock) as t:
            assert t.is_new and t.id not in (sid, new)

    def test_opportunistic_reap_is_throttled(self, container):
        clock = FakeClock()
        for _ in range(4):
            _seed(container, {"x": 1}, clock=clock, timeout=10)
        keep = _seed(container, {"x": 1}, clock=clock, timeout=10_000)
        clock.advance(20)
        container._next_reap = 0.0
        with sesskit.open_session(keep, store=container, clock=clock, reap_interval=100):
            pass
        assert container.count(clock.now) == 1 and container.reap(clock.now) == 0
        _seed(container, {"x": 1}, clock=clock, timeout=10)
        clock.advance(20)
        with sesskit.open_session(keep, store=container, clock=clock, reap_interval=100):
            pass
        assert container.reap(clock.now) == 1       # the second block was inside the interval

    def test_session_used_outside_its_block(self, container):
        s = sesskit.open_session(None, store=container)
        with pytest.raises(sesskit.SesskitError):
            s["a"] = 1
        with s:
            s["a"] = 1
        with pytest.raises(sesskit.SesskitError):
            s["a"]

    def test_bad_lock_mode(self, container):
        with pytest.raises(ValueError):
            sesskit.open_session(None, store=container, lock="shared")


###############################################################################
# File container specifics
###############################################################################


def _files_under(path):
    """Every file below ``path`` but the reaper's own bookkeeping."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith(".reap"))


class TestFileContainer:
    def test_layout_modes_and_fanout(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
        sids = [_seed(store, {"i": i}) for i in range(50)]
        for sid in sids:
            path = os.path.join(store.path, sid[:2], sid)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert len(os.listdir(store.path)) > 30        # ids spread over sub-directories

    def test_hostile_ids_touch_no_file(self, tmp_path):
        outside = tmp_path / "outside"
        outside.mkdir()
        store = sesskit.FileContainer(tmp_path / "s")
        sid = _seed(store, {"a": 1})
        before_in, before_out = _files_under(store.path), _files_under(tmp_path)
        hostile = ["../outside/x", "../../etc/passwd", "/etc/passwd", "a\x00b", "x" * 10_000,
                   "é" * 44, "..", sid[:43] + "/", "." * 44, sid + "\x00"]
        for bad in hostile:
            for lock in sesskit.LOCK_MODES:
                with sesskit.open_session(bad, store=store, lock=lock) as s:
                    assert s.is_new and s.id != bad
        assert _files_under(tmp_path) == before_out
        assert _files_under(store.path) == before_in
        assert os.listdir(outside) == []

    def test_unsafe_directories_are_refused(self, tmp_path):
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        link = tmp_path / "link"
        link.symlink_to(real)
        with pytest.raises(sesskit.ContainerError, match="symbolic link"):
            sesskit.FileContainer(link)
        with pytest.raises(sesskit.ContainerError, match="symbolic link"):
            sesskit.open_session(None, store=f"file:{link}")
        shared = tmp_path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        with pytest.raises(sesskit.ContainerError, match="writable"):
            sesskit.FileContainer(shared)
        os.chmod(shared, 0o770)
        with pytest.raises(sesskit.ContainerError, match="writable"):
            sesskit.FileContainer(shared)
        with pytest.raises(sesskit.ContainerError, match="does not exist"):
            sesskit.FileContainer(tmp_path / "missing", create=False)

    def test_directory_of_another_user_is_refused(self, tmp_path):
        _need(os.geteuid() == 0, "root, to give a directory to another user")
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(sesskit.ContainerError, match="owned by uid 65534"):
            sesskit.FileContainer(theirs)

    def test_default_store_is_a_private_per_user_directory(self, tmp_path, monkeypatch):
        monkeypatch.delenv("SESSKIT_STORE", raising=False)
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        monkeypatch.setattr(sesskit, "_default_stores", {})
        with sesskit.open_session() as s:
            s["a"] = 1
        path = tmp_path / f"sesskit-{os.geteuid()}"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
        assert _stored(f"file:{path}", s.id) == {"a": 1}
        # Another user (or an attacker) planted the default directory as a symlink: refused.
        monkeypatch.setattr(sesskit, "_default_stores", {})
        os.rename(path, tmp_path / "moved")
        os.symlink(tmp_path / "moved", path)
        with pytest.raises(sesskit.ContainerError):
            sesskit.open_session()
        monkeypatch.setenv("SESSKIT_STORE", f"file:{tmp_path / 'env'}")
        with sesskit.open_session() as s:
            s["b"] = 1
        assert _stored(f"file:{tmp_path / 'env'}", s.id) == {"b": 1}

    def test_corrupt_files_give_fresh_sessions(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        for garbage in [b"", b"SSK1", b"\x00" * 5000, os.urandom(3000), b"SSK1" + os.urandom(3000)]:
            sid = _seed(store, {"a": 1})
            with open(os.path.join(store.path, sid[:2], sid), "wb") as f:
                f.write(garbage)
            with sesskit.open_session(sid, store=store) as s:
                assert s.is_new and s.id != sid
                s["b"] = 1
            assert store.load(s.id) is not None

    def test_swapped_file_is_refused(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        mine = _seed(store, {"user": "me"})
        theirs = _seed(store, {"user": "admin"})
        os.replace(os.path.join(store.path, theirs[:2], theirs), os.path.join(store.path, mine[:2], mine))
        assert store.load(mine) is None

    def test_torn_slot_falls_back_to_previous_record(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        sid = _seed(store, {"v": 1})
        with sesskit.open_session(sid, store=store) as s:
            s["v"] = 2
        path = os.path.join(store.path, sid[:2], sid)
        blob = bytearray(open(path, "rb").read())
        _, index, seq, cap = sesskit._parse_session_file(bytes(blob))
        assert (index, seq) == (1, 2)
        offset = 16 + index * cap + 16 + 5
        blob[offset] ^= 0xFF                          # damage the newest record's payload
        open(path, "r+b").write(bytes(blob))
        assert _stored(store, sid) == {"v": 1}
        with sesskit.open_session(sid, store=store) as s:
            s["v"] = 3                                # the next write replaces the torn slot
        assert _stored(store, sid) == {"v": 3}

    def test_write_error_leaves_the_session_intact(self, tmp_path, monkeypatch):
        store = sesskit.FileContainer(tmp_path / "s")
        sid = _seed(store, {"a": 1})

        def full(fd, data, offset):
            os.write(fd, b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(sesskit.ContainerError, match="unchanged"):
            with sesskit.open_session(sid, store=store) as s:
                s["a"] = 2
        monkeypatch.undo()
        assert _stored(store, sid) == {"a": 1}
        with sesskit.open_session(sid, store=store, lock="exclusive", lock_timeout=0) as s:
            s["a"] = 3
        assert _stored(store, sid) == {"a": 3}

    def test_file_size_limit_leaves_sessions_intact(self, tmp_path):
        """A real kernel write failure (RLIMIT_FSIZE, as on a full disk) in a child process."""
        store = sesskit.FileContainer(tmp_path / "s")
        sid = _seed(store, {"a": 1})
        code = (
            "import resource, signal, sys, sesskit\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            f"store = sesskit.FileContainer({store.path!r})\n"
            "try:\n"
            f"    with sesskit.open_session({sid!r}, store=store) as s:\n"
            "        s['big'] = 'x' * 100_000\n"
            "except sesskit.ContainerError as exc:\n"
            "    print('refused:', exc)\n"
            "try:\n"
            "    with sesskit.open_session(None, store=store) as s:\n"
            "        s['big'] = 'x' * 100_000\n"
            "except sesskit.ContainerError as exc:\n"
            "    print('refused:', exc)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("refused:") == 2, out.stdout
        assert _stored(store, sid) == {"a": 1}
        assert [f for f in _files_under(store.path) if f.endswith(".tmp")] == []
        assert store.count() == 1

    def test_durable_writes(self, tmp_path, monkeypatch):
        store = sesskit.FileContainer(tmp_path / "s", durable=True)
        synced = []
        real = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
        sid = _seed(store, {"a": 1})
        assert len(synced) == 2                        # the new file and its directory
        with sesskit.open_session(sid, store=store) as s:
            s["a"] = 2
        assert len(synced) == 3

    def test_reap_budget_resumes(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        clock = FakeClock()
        sids = [_seed(store, {"i": i}, clock=clock, timeout=5) for i in range(60)]
        subdirs = len(os.listdir(store.path))
        removed, calls = 0, 0
        while removed < 60:
            removed += store.reap(T0 + 10, budget=0)          # one sub-directory per call
            calls += 1
            assert calls <= subdirs + 1
        assert calls >= subdirs // 2
        assert all(store.load(sid) is None for sid in sids)

    def test_single_reaper(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        _seed(store, {"a": 1}, clock=FakeClock(), timeout=1)
        fd = os.open(os.path.join(store.path, ".reap-lock"), os.O_RDWR | os.O_CREAT, 0o600)
        sesskit._try_lock(fd)                                  # another reaper is at work
        try:
            assert store.reap(T0 + 10) == 0
        finally:
            os.close(fd)
        assert store.reap(T0 + 10) == 1

    def test_reap_removes_stale_temporary_files(self, tmp_path):
        store = sesskit.FileContainer(tmp_path / "s")
        sid = _seed(store, {"a": 1})
        tmp = os.path.join(store.path, sid[:2], sid + ".123.tmp")
        open(tmp, "wb").write(b"partial")
        os.utime(tmp, (time.time() - 7200, time.time() - 7200))
        store.reap()
        assert not os.path.exists(tmp) and store.load(sid) is not None

    def test_reap_visits_each_entry_once_by_stat(self, tmp_path, monkeypatch):
        store = sesskit.FileContainer(tmp_path / "s")
        clock = FakeClock()
        for i in range(200):
            _seed(store, {"i": i}, clock=clock, timeout=5 if i % 10 == 0 else 10_000)
        opened = []
        real_lock = store.lock
        monkeypatch.setattr(store, "lock", lambda sid, t: (opened.append(sid), real_lock(sid, t))[1])
        assert store.reap(T0 + 10) == 20
        assert store.last_reap_visited == 200
        assert len(opened) == 20                      # only expired candidates were opened


###############################################################################
# Database container specifics (SQLite, LMDB)
###############################################################################

DB_KINDS = ["sqlite", "lmdb"]


@pytest.fixture(params=DB_KINDS)
def db_container(request, tmp_path):
    _need_kind(request.param)
    c = sesskit.open_store(_store_url(request.param, tmp_path))
    yield c
    c.close()


def _other_stripe_sid(sid):
    """A new session id whose lock stripe differs from ``sid``'s."""
    while True:
        other = sesskit.new_session_id()
        if sesskit._StripeLocks._stripe(other) != sesskit._StripeLocks._stripe(sid):
            return other


def _lmdb_grow_worker(url, n):
    store = sesskit.open_store(url)
    for i in range(n):
        with sesskit.open_session(None, store=store, reap_interval=0) as s:
            s["blob"] = "x" * 4000


class TestDatabaseContainers:
    def test_reap_of_one_percent_visits_only_those(self, db_container, monkeypatch):
        import base64
        total, expired = 200_000, 2_000
        raw = os.urandom(33 * total)                          # ids in sesskit's format, made in bulk
        sids = base64.urlsafe_b64encode(raw).decode("ascii")
        dead = sesskit.Record('{"i":1}', T0, T0 + 10, 10.0)
        live = sesskit.Record("{}", T0, T0 + 10_000, 10_000.0)
        records = [(sids[44 * i:44 * i + 44], dead if i % (total // expired) == 0 else live)
                   for i in range(total)]
        db_container._bulk_create(records)
        assert db_container.count(T0) == total
        tried = []
        real_try_many = db_container._stripes.try_many
        monkeypatch.setattr(db_container._stripes, "try_many",
                            lambda sids: (tried.extend(sids), real_try_many(sids))[1])
        assert db_container.reap(T0 + 100) == expired
        assert db_container.last_reap_visited == expired      # the index was walked, not the table
        assert len(tried) == expired                          # only expired sessions were locked
        assert db_container.count(T0 + 100) == total - expired
        assert db_container.reap(T0 + 100) == 0 and db_container.last_reap_visited == 0
        db_container.close()
        import shutil                     # leave no dirty pages behind to slow later tests' fsyncs
        shutil.rmtree(os.path.dirname(db_container.path), ignore_errors=True)

    def test_reap_budget_works_in_batches_and_resumes(self, db_container):
        n = sesskit._REAP_BATCH * 2 + 10
        db_container._bulk_create([(sesskit.new_session_id(), _record({}, timeout=1)) for _ in range(n)])
        got = [db_container.reap(T0 + 5, budget=0) for _ in range(4)]
        assert got == [sesskit._REAP_BATCH, sesskit._REAP_BATCH, 10, 0]

    def test_single_reaper(self, db_container):
        db_container.create(sesskit.new_session_id(), _record({}, timeout=1))
        other = db_container._stripes.try_reaper()          # another process's reaper is at work
        try:
            assert db_container.reap(T0 + 10) == 0
        finally:
            other.release()
        assert db_container.reap(T0 + 10) == 1

    @pytest.mark.parametrize("kind", DB_KINDS)
    def test_lock_timeout_and_killed_holder_across_processes(self, kind, tmp_path):
        _need_kind(kind)
        url = _store_url(kind, tmp_path)
        sid = _seed(url, {"a": 1})
        ctx = multiprocessing.get_context("fork")
        locked, release = ctx.Event(), ctx.Event()
        with _processes(ctx, _hold_lock, [(url, sid, locked, release, "crash")]) as procs:
            assert locked.wait(30), "holder never locked"
            start = time.monotonic()
            with pytest.raises(sesskit.LockTimeout):
                with sesskit.open_session(sid, store=url, lock="exclusive", lock_timeout=0.3):
                    pass
            assert 0.3 <= time.monotonic() - start < 3
            with sesskit.open_session(sid, store=url) as s:   # merge mode: other writes go on
                s["merged"] = True
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].join(10)
            with sesskit.open_session(sid, store=url, lock="exclusive", lock_timeout=5) as s:
                s["after"] = True
        assert _stored(url, sid) == {"a": 1, "merged": True, "after": True}

    def test_stripe_is_a_stable_hash(self):
        sid = sesskit.new_session_id()
        code = f"import sesskit; print(sesskit._StripeLocks._stripe({sid!r}))"
        outs = {subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                               env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout.strip()
                for seed in ("1", "2")}
        assert outs == {sesskit._StripeLocks._stripe(sid)}

    def test_exclusive_lock_does_not_block_other_sessions(self, db_container):
        sid = sesskit.new_session_id()
        db_container.create(sid, _record({"n": 1}))
        other = _other_stripe_sid(sid)
        db_container.create(other, _record({"n": 1}))
        held = db_container.lock(sid, 1)                     # an exclusive block is running user code
        try:
            done = []

            def write_other():
                meta = sesskit.Record(None, T0, T0 + 100, 100.0)
                done.append(db_container.update(other, {"n": 2}, [], meta, T0))
                db_container.create(sesskit.new_session_id(), _record({"x": 1}))
                db_container.touch(sid, T0 + 300)            # a touch needs no session lock
                done.append(True)
            t = ExThread(target=write_other)
            t.start()
            t.join(10)
            assert done == [True, True]
        finally:
            held.release()
        assert json.loads(db_container.load(other).data) == {"n": 2}

    def test_key_order_is_kept(self, db_container):
        sid = sesskit.new_session_id()
        db_container.create(sid, _record({"z": 1, "a": 2, "m": 3}))
        meta = sesskit.Record(None, T0, T0 + 100, 100.0)
        assert db_container.update(sid, {"a": 5, "b": 6}, ["z"], meta, T0)
        assert list(json.loads(db_container.load(sid).data)) == ["a", "m", "b"]

    def test_unicode_and_nested_values_round_trip(self, db_container):
        data = {"é": "ü€😀", "n": {"l": [1, 2.5, None, True]}, "q": "\"\\\n"}
        sid = _seed(db_container, data)
        assert _stored(db_container, sid) == data

    def test_pickled_clone_shares_the_store_and_closes_independently(self, db_container):
        import pickle
        sid = _seed(db_container, {"a": 1})
        clone = pickle.loads(pickle.dumps(db_container))
        assert json.loads(clone.load(sid).data) == {"a": 1}
        clone.close()
        assert json.loads(db_container.load(sid).data) == {"a": 1}     # the original still works
        clone.close()                                                  # closing twice is fine
        assert clone.load(sid) is not None                             # and it reopens on demand

    def test_symlinked_store_is_refused(self, tmp_path):
        for kind in DB_KINDS:
            _need_kind(kind)
            real = tmp_path / f"real-{kind}"
            sesskit.open_store(f"{kind}:{real}").close()
            link = tmp_path / f"link-{kind}"
            link.symlink_to(real)
            with pytest.raises(sesskit.ContainerError, match="symbolic link"):
                sesskit.open_store(f"{kind}:{link}")


class TestSQLiteContainer:
    def test_merge_writes_only_changed_rows(self, tmp_path):
        store = sesskit.SQLiteContainer(tmp_path / "s.db")
        sid = _seed(store, {f"k{i}": i for i in range(50)})
        con = store._conn()
        before = con.total_changes
        with sesskit.open_session(sid, store=store, reap_interval=0) as s:
            s["k7"] = "new"
            del s["k9"]
        assert con.total_changes - before == 3              # the session row, one upsert, one delete
        before = con.total_changes
        store.touch(sid, time.time() + 10_000)
        assert con.total_changes - before == 1

    def test_wal_durability_and_connections(self, tmp_path):
        store = sesskit.SQLiteContainer(tmp_path / "s.db")
        assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 1      # NORMAL
        durable = sesskit.SQLiteContainer(tmp_path / "s.db", durable=True)
        assert durable._conn().execute("PRAGMA synchronous").fetchone()[0] == 2    # FULL
        assert stat.S_IMODE(os.stat(tmp_path / "s.db").st_mode) == 0o600
        other = []
        t = ExThread(target=lambda: other.append(store._conn()))
        t.start()
        t.join()
        assert other[0] is not store._conn()                # one connection per thread
        store.close()
        durable.close()

    def test_connections_of_ended_threads_are_closed(self, tmp_path):
        store = sesskit.SQLiteContainer(tmp_path / "s.db")
        sid = _seed(store, {"a": 1})
        for _ in range(20):                                  # a thread per request
            t = ExThread(target=store.load, args=(sid,))
            t.start()
            t.join()
        assert len(store._connections) <= 2
        store.close()

    def test_fork_child_gets_its_own_connection(self, tmp_path):
        store = sesskit.SQLiteContainer(tmp_path / "s.db")
        sid = _seed(store, {"a": 1})
        parent_con = store._conn()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                         # child
            ok = store._conn() is not parent_con and store.load(sid) is not None
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
        assert store._conn() is parent_con and store.load(sid) is not None

    def test_database_is_locked_is_retried(self, tmp_path, monkeypatch):
        store = sesskit.SQLiteContainer(tmp_path / "s.db")
        sid = _seed(store, {"a": 1})
        monkeypatch.setitem(sesskit.DEFAULTS, "sqlite_busy_timeout", 0.01)
        store.close()
        blocker = __import__("sqlite3").connect(str(tmp_path / "s.db"), isolation_level=None,
                                              check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")                   # another process holds the write lock
        t = threading.Timer(0.3, blocker.execute, ("COMMIT",))
        t.start()
        try:
            store.touch(sid, time.time() + 10_000)           # waits it out instead of failing
        finally:
            t.join()
            blocker.close()
        assert store.load(sid).expires > time.time()


class TestLMDBContainer:
    @pytest.fixture(autouse=True)
    def _lmdb(self):
        _need_kind("lmdb")

    def test_missing_package_says_how_to_install(self, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "lmdb", None)
        with pytest.raises(ImportError, match=r"pip install 'sesskit\[lmdb\]'"):
            sesskit.LMDBContainer(tmp_path / "s")

    def test_durability_defaults(self, tmp_path):
        store = sesskit.LMDBContainer(tmp_path / "s")
        flags = store._env().env.flags()
        assert flags["sync"] and not flags["metasync"]
        store.close()
        durable = sesskit.LMDBContainer(tmp_path / "d", durable=True)
        assert durable._env().env.flags()["metasync"]
        durable.close()
        assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700

    def test_one_environment_per_process(self, tmp_path):
        a = sesskit.LMDBContainer(tmp_path / "s")
        b = sesskit.open_store(f"lmdb:{tmp_path / 's'}")
        assert a._env() is b._env() and a._env().users == 2
        a.close()
        sid = _seed(b, {"x": 1})                             # b's environment stays open
        assert _stored(b, sid) == {"x": 1}
        b.close()

    def test_map_grows_when_full_and_other_processes_follow(self, tmp_path):
        url = f"lmdb:{tmp_path / 's'}"
        store = sesskit.LMDBContainer(tmp_path / "s", map_size=256 * 1024)
        sid = _seed(store, {"a": 1})
        ctx = multiprocessing.get_context("spawn")
        _run_all(ctx, _lmdb_grow_worker, [(url, 100)])       # another process fills and grows the map
        with sesskit.open_session(sid, store=store) as s:    # this one adopts the new size
            s["b"] = "y" * 4000
        for _ in range(100):                                 # and grows it further itself
            _seed(store, {"blob": "z" * 4000})
        assert store._env().env.info()["map_size"] > 256 * 1024
        assert store.count() == 201 and _stored(store, sid)["a"] == 1
        store.close()

    def test_fork_child_reopens_and_parent_keeps_its_environment(self, tmp_path):
        store = sesskit.LMDBContainer(tmp_path / "s")
        sid = _seed(store, {"a": 1})
        parent_env = store._env()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                         # child
            try:
                env = store._env()
                ok = env is not parent_env and env.pid == os.getpid() and store.load(sid) is not None
                with sesskit.open_session(sid, store=store) as s:
                    s["child"] = True
            except BaseException:
                ok = False
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
        assert store._env() is parent_env
        assert _stored(store, sid) == {"a": 1, "child": True}
        with sesskit.open_session(sid, store=store) as s:
            s["parent"] = True
        assert _stored(store, sid) == {"a": 1, "child": True, "parent": True}

    def test_stale_reader_slots_are_cleared_by_reap(self, tmp_path):
        store = sesskit.LMDBContainer(tmp_path / "s")
        _seed(store, {"a": 1})
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                         # child: take a reader slot, then die
            txn = store._env().env.begin()
            txn.get(b"x")
            os.write(w, b"1")
            time.sleep(60)
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        env = store._env().env
        assert f" {pid} " in env.readers()                    # the killed reader's slot is left over
        store.reap()
        assert f" {pid} " not in env.readers()
        store.close()


###############################################################################
# Many processes and threads on one session
###############################################################################


def _merge_worker(url, sid, worker, n):
    store = sesskit.open_store(url)
    for i in range(n):
        with sesskit.open_session(sid, store=store) as s:
            assert not s.is_new, "the hot session vanished"
            s[f"w{worker}-{i}"] = i


def _exclusive_worker(url, sid, worker, n):
    store = sesskit.open_store(url)
    for i in range(n):
        with sesskit.open_session(sid, store=store, lock="exclusive", lock_timeout=60) as s:
            s["n"] += 1
            s[f"w{worker}"] = i


def _inherited_worker(store, sid, worker, n):
    """Fork worker using the container object its parent opened before forking."""
    for i in range(n):
        with sesskit.open_session(sid, store=store) as s:
            s[f"w{worker}-{i}"] = i


class TestMultiProcess:
    P, N = 8, 50

    def _check_merge(self, url, sid):
        data = _stored(url, sid)
        expected = {f"w{w}-{i}" for w in range(self.P) for i in range(self.N)}
        assert expected - set(data) == set(), f"lost {len(expected - set(data))} keys"

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_merge_loses_no_key(self, shared_url, method):
        sid = _seed(shared_url, {"start": 1})
        ctx = multiprocessing.get_context(method)
        _run_all(ctx, _merge_worker, [(shared_url, sid, w, self.N) for w in range(self.P)])
        self._check_merge(shared_url, sid)

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_exclusive_counts_exactly(self, shared_url, method):
        sid = _seed(shared_url, {"n": 0})
        ctx = multiprocessing.get_context(method)
        _run_all(ctx, _exclusive_worker, [(shared_url, sid, w, self.N) for w in range(self.P)])
        assert _stored(shared_url, sid)["n"] == self.P * self.N

    def test_fork_after_store_opened(self, shared_url):
        store = sesskit.open_store(shared_url)
        sid = _seed(store, {"start": 1})
        with sesskit.open_session(sid, store=store) as s:    # the parent has used the store
            s["parent"] = 1
        ctx = multiprocessing.get_context("fork")
        _run_all(ctx, _inherited_worker, [(store, sid, w, self.N) for w in range(self.P)])
        self._check_merge(store, sid)
        with sesskit.open_session(sid, store=store) as s:    # and the parent's store still works
            s["parent"] = 2
        assert _stored(store, sid)["parent"] == 2

    def test_threads_merge_and_exclusive(self, container):
        sid = _seed(container, {"n": 0})
        threads = [ExThread(target=_merge_worker, args=(container, sid, w, self.N)) for w in range(self.P)]
        threads += [ExThread(target=_exclusive_worker, args=(container, sid, w + 100, self.N))
                    for w in range(self.P)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self._check_merge(container, sid)
        assert _stored(container, sid)["n"] == self.P * self.N

    def test_processes_and_threads_together(self, shared_url):
        sid = _seed(shared_url, {"n": 0})
        ctx = multiprocessing.get_context("spawn")
        with _processes(ctx, _exclusive_worker, [(shared_url, sid, w, self.N) for w in range(4)]) as procs:
            threads = [ExThread(target=_exclusive_worker, args=(shared_url, sid, w + 10, self.N))
                       for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            for p in procs:
                p.join(120)
            assert [p.exitcode for p in procs] == [0] * 4
        assert _stored(shared_url, sid)["n"] == 8 * self.N


def _crash_writer(url, sids, ready):
    """Write forever, each record self-consistent, until SIGKILLed."""
    store = sesskit.open_store(url)
    rnd = random.Random(os.getpid())
    i = 0
    ready.set()
    while True:
        i += 1
        sid = rnd.choice(sids)
        size = rnd.choice([10, 500, 3000, 20_000])           # some writes move the record to a new file
        with sesskit.open_session(sid, store=store, lock=rnd.choice(["merge", "exclusive"])) as s:
            s["n"] = i
            s["copy"] = i
            s["blob"] = "x" * size
            s["check"] = len(s["blob"])


class TestCrashSafety:
    def test_sigkill_mid_write_leaves_every_session_loadable(self, shared_url):
        sids = [_seed(shared_url, {"n": 0, "copy": 0, "blob": "", "check": 0}) for _ in range(3)]
        ctx = multiprocessing.get_context("fork")
        rnd = random.Random(1)
        kills = 0
        for round_ in range(12):
            ready = ctx.Event()
            with _processes(ctx, _crash_writer, [(shared_url, sids, ready) for _ in range(3)]) as procs:
                assert ready.wait(30)
                time.sleep(rnd.uniform(0.01, 0.15))
                for p in procs:
                    os.kill(p.pid, signal.SIGKILL)
                    kills += 1
                for p in procs:
                    p.join(10)
            for sid in sids:
                data = _stored(shared_url, sid)
                assert data is not None, f"session lost after kill round {round_}"
                assert data["n"] == data["copy"] and data["check"] == len(data["blob"])
            # and every session is still writable: no lock outlived its killed holder
            for sid in sids:
                with sesskit.open_session(sid, store=shared_url, lock="exclusive", lock_timeout=5) as s:
                    assert not s.is_new
        assert kills == 36
        written = max(_stored(shared_url, sid)["n"] for sid in sids)
        assert written > 10, "the writers were killed before writing anything"


###############################################################################
# Model-based tests
###############################################################################


class SessionMachine(RuleBasedStateMachine):
    """Drive a container through open_session with a fake clock and compare it with a dict model."""

    KIND = "file"
    TIMEOUT = 100.0

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="sesskit-model-")
        self.url = _store_url(self.KIND, __import__("pathlib").Path(self.dir))
        self.store = sesskit.open_store(self.url)
        self.clock = FakeClock()
        self.model = {}            # sid -> [data dict, expires]
        self.dead = []

    def teardown(self):
        import shutil
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _live(self):
        return [sid for sid, (_, exp) in self.model.items() if exp >= self.clock.now]

    def _open(self, sid, **kw):
        return sesskit.open_session(sid, store=self.store, clock=self.clock, timeout=self.TIMEOUT,
                                    reap_interval=0, **kw)

    keys = st.sampled_from(["a", "b", "c", "user", "cart"])
    values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
                          | st.floats(allow_nan=False, allow_infinity=False),
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)

    @rule(data=st.dictionaries(keys, values, min_size=1, max_size=4))
    def create(self, data):
        with self._open(None) as s:
            s.update(data)
        self.model[s.id] = [json.loads(json.dumps(data)), self.clock.now + self.TIMEOUT]

    def _touch(self, sid, changed):
        entry = self.model[sid]
        new = self.clock.now + self.TIMEOUT
        if changed or new - entry[1] >= min(sesskit.DEFAULTS["touch_interval"], self.TIMEOUT / 10):
            entry[1] = new

    @precondition(lambda self: self._live())
    @rule(pick=st.randoms(use_true_random=False), key=keys, value=values,
          lock=st.sampled_from(["merge", "exclusive"]))
    def set_key(self, pick, key, value, lock):
        sid = pick.choice(self._live())
        with self._open(sid, lock=lock) as s:
            assert not s.is_new
            s[key] = value
        entry = self.model[sid]
        changed = json.dumps(entry[0].get(key, object), default=repr) != json.dumps(value)
        entry[0][key] = json.loads(json.dumps(value))
        self._touch(sid, changed)

    @precondition(lambda self: self._live())
    @rule(pick=st.randoms(use_true_random=False), key=keys)
    def delete_key(self, pick, key):
        sid = pick.choice(self._live())
        with self._open(sid) as s:
            s.pop(key, None)
        changed = key in self.model[sid][0]
        self.model[sid][0].pop(key, None)
        self._touch(sid, changed)

    @precondition(lambda self: self._live())
    @rule(pick=st.randoms(use_true_random=False))
    def read(self, pick):
        sid = pick.choice(self._live())
        with self._open(sid, lock="read") as s:
            assert dict(s) == self.model[sid][0]
        self._touch(sid, False)

    @precondition(lambda self: self._live())
    @rule(pick=st.randoms(use_true_random=False))
    def logout(self, pick):
        sid = pick.choice(self._live())
        with self._open(sid) as s:
            s.delete()
        del self.model[sid]
        self.dead.append(sid)

    @rule(seconds=st.sampled_from([1.0, 9.0, 30.0, 99.0, 150.0]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def reap(self):
        removed = self.store.reap(self.clock.now)
        expired = [sid for sid, (_, exp) in self.model.items() if exp < self.clock.now]
        assert removed == len(expired)
        for sid in expired:
            del self.model[sid]
            self.dead.append(sid)

    @precondition(lambda self: self.KIND != "memory")
    @rule()
    def reopen(self):
        self.store.close()
        self.store = sesskit.open_store(self.url)

    @invariant()
    def matches_model(self):
        now = self.clock.now
        for sid, (data, expires) in self.model.items():
            record = self.store.load(sid)
            if expires >= now:
                assert record is not None and json.loads(record.data) == data
                assert record.expires == expires
            else:
                assert record is None or record.expires < now
        for sid in self.dead[-5:]:
            record = self.store.load(sid)
            assert record is None or record.expires < now
        assert self.store.count(now) == len(self._live())


class MemorySessionMachine(SessionMachine):
    KIND = "memory"


_machine_settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
TestFileModel = SessionMachine.TestCase
TestFileModel.settings = _machine_settings
TestMemoryModel = MemorySessionMachine.TestCase
TestMemoryModel.settings = _machine_settings


class SQLiteSessionMachine(SessionMachine):
    KIND = "sqlite"


class LMDBSessionMachine(SessionMachine):
    KIND = "lmdb"


TestSQLiteModel = SQLiteSessionMachine.TestCase
TestSQLiteModel.settings = _machine_settings
TestLMDBModel = LMDBSessionMachine.TestCase
TestLMDBModel.settings = _machine_settings
if not _have_lmdb() and not REQUIRE_INTEGRATION:
    TestLMDBModel = pytest.mark.skip(reason="the lmdb package is not installed")(TestLMDBModel)


###############################################################################
# Import cost and laziness
###############################################################################


class TestImport:
    def test_import_pulls_only_cheap_stdlib_modules(self):
        code = ("import sys; before = set(sys.modules); import json, fcntl; base = set(sys.modules); "
                "import sesskit; print(' '.join(sorted(set(sys.modules) - base)))")
        out = subprocess.run([sys.executable, "-S", "-c", code], cwd=HERE, capture_output=True,
                             text=True, timeout=60, check=True).stdout.split()
        assert "sesskit" in out
        heavy = {"lmdb", "redis", "sqlite3", "_sqlite3", "socket", "tempfile", "threading", "secrets",
                 "random", "hashlib", "typing", "shutil", "subprocess", "http", "urllib", "email",
                 "wsgiref", "logging", "argparse"}
        assert heavy.isdisjoint(out), heavy.intersection(out)
        assert set(out) <= {"sesskit", "binascii", "struct", "_struct", "zlib", "itertools",
                            "collections", "collections.abc", "stat", "_stat", "errno", "os", "os.path",
                            "posixpath", "genericpath"}, out
