"""RedisStore against a real redis-server: layout, conditional writes, leases, threads, processes, outages."""
import importlib.util
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from telesession.errors import ConflictError, LockTimeout, StoreError
from telesession.stores import from_url

from support import count_of, increment  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.redis

if importlib.util.find_spec("redis") is None and os.environ.get("TELESESSION_REQUIRE_REDIS") != "1":
    pytest.skip("the redis package is not installed: pip install -e .[redis]", allow_module_level=True)

HOSTILE_KEYS = ["../x", "/", "\\", "..", ".", "ключ 🔑", "k" * 300, "lock:x", "x", "l:x", "s:x",
                "a\x00b", "*", "[a]", "?", "", " ", "\udcff"]


def open_store(url, **options):
    from telesession.stores.redis import RedisStore

    return RedisStore(url, **options)


# -- child-process bodies (module level: spawn pickles them by name) ---------------------

def _hold_in_child(url, key, ready, done, lease):
    store = open_store(url, lease=lease)
    token = store.acquire(key, 10)
    try:
        ready.set()
        done.wait(30)
    finally:
        store.release(key, token)
        store.close()


def _stalled_holder(url, key, ready, go, results):
    """Hold ``key`` with a 0.3 s lease, get stopped (SIGSTOP) past it, then try to save."""
    store = open_store(url, lease=0.3)
    token = store.acquire(key, 10)
    try:
        raw = store.load(key)
        ready.set()
        go.wait(30)
        try:
            store.save(key, b"stale holder's write", previous=raw)
            results.put("saved")
        except ConflictError as exc:
            results.put(f"conflict: {exc}")
    finally:
        store.release(key, token)
        store.close()


@pytest.fixture
def store(redis_store_url):
    s = open_store(redis_store_url)
    yield s
    s.close()


@pytest.fixture
def raw(redis_server):
    client = redis_server.client()
    yield client
    client.close()


def test_round_trip_keys_and_layout(store, raw):
    assert store.load("a") is None
    store.save("a", b'{"data":1}')
    store.save("b", b"two")
    assert store.load("a") == b'{"data":1}'
    # A plain string value: redis-cli GET shows it.
    assert raw.get(store.prefix + "s:{a}") == b'{"data":1}'
    store.save("a", b"three", previous=b'{"data":1}')
    assert sorted(store.keys()) == ["a", "b"]
    store.delete("a", previous=b"three")
    assert store.load("a") is None and raw.exists(store.prefix + "s:{a}") == 0
    store.delete("a")
    store.delete("b")
    assert list(store.keys()) == []


def test_lock_layout_and_release(store, raw):
    token = store.acquire("k", 1)
    try:
        lock_key = store.prefix + "l:{k}"
        assert raw.get(lock_key) == token.token
        assert 0 < raw.pttl(lock_key) <= 30000
        assert raw.exists(store.prefix + "s:{k}") == 0  # a lock is not a session
        assert list(store.keys()) == []
    finally:
        store.release("k", token)
    assert raw.exists(store.prefix + "l:{k}") == 0


def _gets(raw) -> int:
    return int(raw.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_the_lock_script_reads_the_session_so_a_handler_costs_one_round_trip_less(store, raw):
    store.save("k", b"v1")
    token = store.acquire("k", 1)
    try:
        before = _gets(raw)
        assert store.load_locked("k", token) == b"v1"  # served from the lock script's reply
        assert _gets(raw) == before
        store.save("k", b"v2", previous=b"v1")
        before = _gets(raw)
        assert store.load("k") == b"v2"  # a plain load always asks Redis
        assert store.load_locked("k", token) == b"v2"  # the copy is handed out once only
        assert _gets(raw) == before + 2
    finally:
        store.release("k", token)
    token = store.acquire("absent", 1)
    try:
        assert store.load_locked("absent", token) is None
    finally:
        store.release("absent", token)


def _calls(raw, command: str) -> int:
    return int(raw.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_an_increment_takes_two_round_trips_and_leaves_no_lock(store, raw):
    from telesession import Sessions

    sessions = Sessions(store, initial=lambda: {"n": 0})
    with sessions.open("k") as s:
        s["n"] += 1  # creates it: warms the script cache too
    before = {c: _calls(raw, c) for c in ("evalsha", "get", "set", "del")}
    gets_before = before["get"]
    with sessions.open("k") as s:
        s["n"] += 1
    assert _calls(raw, "evalsha") - before["evalsha"] == 2  # lock+read, then write+unlock
    assert _calls(raw, "set") - before["set"] == 2 and _calls(raw, "del") - before["del"] == 1  # inside them
    assert _calls(raw, "get") - gets_before == 3  # 1 in the lock script, 2 in the write: no GET of its own
    assert raw.exists(store.prefix + "l:{k}") == 0
    with sessions.open("k") as s:
        assert s["n"] == 2


def test_a_conflicting_write_and_unlock_raises_and_still_unlocks(store, raw):
    from telesession import Sessions

    sessions = Sessions(store, initial=lambda: {"n": 0})
    with pytest.raises(ConflictError, match="changed by another writer"):
        with sessions.open("k") as s:
            raw.set(store.prefix + "s:{session:k}", b"written behind our back")
            s["n"] = 1
    assert raw.exists(store.prefix + "l:{session:k}") == 0
    assert raw.get(store.prefix + "s:{session:k}") == b"written behind our back"  # nothing overwritten
    token = store.acquire("session:k", 0)  # free again at once, here and in Redis
    store.release("session:k", token)


def test_a_retried_write_and_unlock_whose_first_reply_was_lost_succeeds(store, raw):
    token = store.acquire("k", 1)
    args = store._save_args(token, b"new", None, None, release=True)
    keys = [store.prefix + "s:{k}", token.lock_key]
    assert store._save_script(keys=keys, args=args) == 1
    assert raw.exists(store.prefix + "l:{k}") == 0  # the lock went with the write
    assert store._save_script(keys=keys, args=args) == 1  # the retry finds its own record: done
    other = store._save_args(token, b"other", b"new", None, release=True)
    assert store._save_script(keys=keys, args=other) == -1  # a different record: the lock is gone
    store.release("k", token)


def test_a_session_written_through_another_store_object_is_never_served_stale(redis_store_url):
    from telesession import Sessions

    one, two = open_store(redis_store_url), open_store(redis_store_url)
    try:
        outer, inner = Sessions(one, initial=lambda: {"n": 0}), Sessions(two, initial=lambda: {"n": 0})
        with outer.open("k") as s:  # two's scope re-enters the same held key (same location)
            s["n"] = 1
            with inner.open("k") as t:
                assert t["n"] == 1  # the very same session object, not a second read
                t["n"] = 2
        with inner.open("k") as t:
            assert t["n"] == 2
            t["n"] = 3
        with outer.open("k") as s:
            assert s["n"] == 3
    finally:
        one.close()
        two.close()


def test_ttl_is_native_expiry(store, raw):
    store.save("short", b"s", ttl=0.2)
    assert 0 < raw.pttl(store.prefix + "s:{short}") <= 200
    store.save("short", b"s2", previous=b"s")  # no ttl: persistent again
    assert raw.pttl(store.prefix + "s:{short}") == -1
    store.save("short", b"s3", previous=b"s2", ttl=0.2)
    deadline = time.monotonic() + 5
    while store.load("short") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.load("short") is None
    assert store.purge_expired() == 0


def test_conditional_save_refuses_a_changed_record(store):
    store.save("k", b"v1")
    with pytest.raises(ConflictError) as info:
        store.save("k", b"mine", previous=b"v0")
    assert info.value.key == "k" and "s:{k}" in str(info.value) and store.address in str(info.value)
    with pytest.raises(ConflictError):
        store.save("k", b"mine", previous=None)
    with pytest.raises(ConflictError):
        store.delete("k", previous=b"v0")
    assert store.load("k") == b"v1"
    store.delete("gone", previous=b"whatever")  # already absent: the wanted end state
    with pytest.raises(ConflictError):
        store.save("gone", b"x", previous=b"whatever")
    assert store.load("gone") is None
    assert store.conditional is True


def test_hostile_keys_are_distinct_and_round_trip(store):
    for i, key in enumerate(HOSTILE_KEYS):
        store.save(key, f"record {i}".encode())
    for i, key in enumerate(HOSTILE_KEYS):
        assert store.load(key) == f"record {i}".encode()
    assert sorted(store.keys()) == sorted(HOSTILE_KEYS)
    token = store.acquire("x", 1)  # holding "x" must not hold "lock:x" or "l:x"
    try:
        taken = []

        def other():
            for key in ("lock:x", "l:x"):
                t = store.acquire(key, 1)
                taken.append(key)
                store.release(key, t)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
        assert taken == ["lock:x", "l:x"]
    finally:
        store.release("x", token)


def test_prefixes_are_isolated_even_with_glob_characters(redis_url):
    weird = open_store(redis_url, prefix="we*rd[1]:")
    plain = open_store(redis_url, prefix="we")
    other = open_store(redis_url + "?prefix=werd1:")
    try:
        assert other.prefix == "werd1:"
        weird.save("k", b"1")
        plain.save("rd-k", b"2")
        other.save("k2", b"3")
        assert list(weird.keys()) == ["k"]
        assert list(plain.keys()) == ["rd-k"]
        assert list(other.keys()) == ["k2"]
    finally:
        for s, key in ((weird, "k"), (plain, "rd-k"), (other, "k2")):
            s.delete(key)
            s.close()


def test_keys_scans_many(store, raw):
    expected = {f"key-{i:05d}" for i in range(1500)}
    pipe = raw.pipeline()
    for key in expected:
        pipe.set(store.prefix + "s:{" + key + "}", b"x")
    pipe.execute()
    assert set(store.keys()) == expected


def test_a_client_object_and_a_url_share_locks(redis_server, redis_store_url):
    import redis

    prefix = redis_store_url.split("prefix=", 1)[1]
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=0)
    with open_store(client, prefix=prefix) as first, from_url(redis_store_url) as second:
        assert first.location == second.location
        token = first.acquire("k", 1)
        try:
            failure = []
            thread = threading.Thread(target=lambda: failure.extend(_timeout_of(second, "k", 0.2)))
            thread.start()
            thread.join(10)
            assert len(failure) == 1
        finally:
            first.release("k", token)
    client.ping()  # a client we were given is not closed by the store
    client.close()


def _timeout_of(store, key, timeout):
    try:
        store.release(key, store.acquire(key, timeout))
    except LockTimeout as exc:
        return [exc]
    return []


def test_a_process_holding_a_key_excludes_others(redis_store_url, raw):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    # A short lease: the holder must keep it alive by renewal while we wait.
    child = ctx.Process(target=_hold_in_child, args=(redis_store_url, "busy", ready, done, 0.5))
    child.start()
    try:
        assert ready.wait(60)
        with open_store(redis_store_url) as store:
            time.sleep(1.0)  # two leases long: only renewal keeps the child's lock
            started = time.monotonic()
            with pytest.raises(LockTimeout) as info:
                store.acquire("busy", 0.5)
            assert 0.45 <= time.monotonic() - started < 10
            assert info.value.key == "busy" and "busy" in str(info.value)
            token = store.acquire("other", 1)
            store.save("other", b"x")
            store.release("other", token)
            done.set()
            child.join(30)
            assert child.exitcode == 0
            assert raw.exists(store.prefix + "l:{busy}") == 0  # the child released its lock
            token = store.acquire("busy", 5)
            store.release("busy", token)
    finally:
        done.set()
        child.join(30)


def test_renewal_keeps_a_short_lease_alive(redis_store_url, raw):
    with open_store(redis_store_url, lease=0.5) as store:
        token = store.acquire("k", 1)
        try:
            raw_before = store.load("k")
            time.sleep(1.6)  # three leases
            lock_key = store.prefix + "l:{k}"
            assert raw.get(lock_key) == token.token
            assert raw.set(lock_key, b"intruder", nx=True) is None
            store.save("k", b"after a long handler", previous=raw_before)
        finally:
            store.release("k", token)
        assert store.load("k") == b"after a long handler"


def test_a_stalled_holder_whose_lease_expired_cannot_overwrite(redis_store_url, raw):
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    with open_store(redis_store_url) as store:
        store.save("k", b"original")
        child = ctx.Process(target=_stalled_holder, args=(redis_store_url, "k", ready, go, results))
        child.start()
        try:
            assert ready.wait(60)
            os.kill(child.pid, signal.SIGSTOP)  # a GC pause, a swapped-out VM: renewal stops too
            try:
                time.sleep(0.8)
                token = store.acquire("k", 10)  # its lease ran out: we get the lock
            finally:
                os.kill(child.pid, signal.SIGCONT)
            try:
                store.save("k", b"newer session", previous=b"original")
                go.set()
                outcome = results.get(timeout=30)
                assert outcome.startswith("conflict"), outcome
                child.join(30)
                assert child.exitcode == 0
                # The stale holder's release did not remove our lock.
                assert raw.get(store.prefix + "l:{k}") == token.token
            finally:
                store.release("k", token)
            assert store.load("k") == b"newer session"
        finally:
            go.set()
            child.join(30)


def test_lock_taken_over_by_another_holder_blocks_save_and_is_not_released(store, raw):
    store.save("k", b"v1")
    token = store.acquire("k", 1)
    lock_key = store.prefix + "l:{k}"
    try:
        loaded = store.load("k")
        # Another machine took the lock after our lease ran out (written here by a plain client).
        raw.set(lock_key, b"another holder", px=30000)
        with pytest.raises(ConflictError, match="no longer ours"):
            store.save("k", b"v2", previous=loaded)
        with pytest.raises(ConflictError):  # remembered: no second round trip needed
            store.delete("k", previous=loaded)
    finally:
        store.release("k", token)
    assert raw.get(lock_key) == b"another holder"  # never release another holder's lock
    assert store.load("k") == b"v1"
    with pytest.raises(LockTimeout):
        store.acquire("k", 0.2)
    raw.delete(lock_key)
    increment(store, "k2")


def test_redis_outage_raises_store_error_and_recovers(redis_server, redis_store_url, caplog):
    store = open_store(redis_store_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        increment(store, "k")
        token = store.acquire("held", 1)
        raw_held = store.load("held")
        redis_server.stop()
        caplog.set_level(logging.WARNING, logger="telesession")
        for call in (lambda: store.load("k"), lambda: increment(store, "k", timeout=5),
                     lambda: list(store.keys()),
                     lambda: store.save("held", b"x", previous=raw_held)):
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                call()
            assert time.monotonic() - started < 15
            assert not isinstance(info.value, (ConflictError, LockTimeout))
            assert f"127.0.0.1:{redis_server.port}" in str(info.value)
        assert info.value.key == "held" and "s:{held}" in info.value.where
        store.release("held", token)  # cannot reach Redis: logged, not raised; the lease expires
        assert any("held" in r.getMessage() for r in caplog.records)
        redis_server.start()
        assert store.load("k") is None  # no persistence: a fresh, empty server
        increment(store, "k")
        increment(store, "held")
        assert count_of(store, "k") == 1 and count_of(store, "held") == 1
        redis_server.restart()  # while idle: the pooled connections are stale now
        assert store.load("k") is None  # reconnected on the first call, no error
    finally:
        redis_server.start()
        store.close()


def test_errors_never_show_the_password(caplog):
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://alice:s3cr3t-pw@127.0.0.1:{port}/2?prefix=p:"
    store = from_url(url, socket_connect_timeout=1)
    caplog.set_level(logging.DEBUG, logger="telesession")
    try:
        assert "s3cr3t" not in repr(store) and "s3cr3t" not in repr(store.location)
        assert store.prefix == "p:" and store.address == f"redis://127.0.0.1:{port}/2"
        for call in (lambda: store.load("k"), lambda: store.acquire("k", 1), lambda: list(store.keys())):
            with pytest.raises(StoreError) as info:
                call()
            assert "s3cr3t" not in str(info.value) and "s3cr3t" not in (info.value.where or "")
            assert f"127.0.0.1:{port}" in str(info.value)
    finally:
        store.close()
    assert all("s3cr3t" not in r.getMessage() for r in caplog.records)


def test_importing_telesession_stores_does_not_import_redis():
    code = ("import sys, telesession.stores, telesession.stores.sqlite; "
            "print('redis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_bad_options(redis_url):
    with pytest.raises(ValueError, match="lease"):
        open_store(redis_url, lease=0)
    with pytest.raises(ValueError, match="lease"):
        open_store(redis_url + "?lease=soon")


def test_prefix_and_lease_in_the_url(redis_url):
    with from_url(redis_url + "?prefix=p1:&lease=2.5&health_check_interval=10") as store:
        assert store.prefix == "p1:" and store.lease == 2.5
        assert store.client.connection_pool.connection_kwargs["health_check_interval"] == 10
    import redis

    client = redis.Redis(host="127.0.0.1", port=1)
    with pytest.raises(TypeError, match="URL"):
        open_store(client, socket_keepalive=True)
    client.close()


def test_a_client_with_decode_responses_works_too(redis_server, redis_store_url):
    import redis

    prefix = redis_store_url.split("prefix=", 1)[1]
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=0, decode_responses=True)
    try:
        store = open_store(client, prefix=prefix)
        for _ in range(3):
            increment(store, "ключ")
        assert count_of(store, "ключ") == 3 and isinstance(store.load("ключ"), bytes)
        assert list(store.keys()) == ["ключ"]
        store.close()
    finally:
        client.close()


def test_keys_and_records_by_prefix_escape_glob_characters_and_stream_in_batches(store, raw):
    expected = {f"a*[{i}]": f"r{i}".encode() for i in range(1200)}  # more than one MGET batch
    expected.update({"ab": b"x", "a": b"y", "": b"empty", "~t": b"tilde", "}t": b"brace"})
    pipe = raw.pipeline()
    for key, value in expected.items():
        pipe.set(store._session_key(key), value)
    pipe.execute()
    assert raw.get(store.prefix + "s:{ab}") == b"x" and raw.get(store.prefix + "s:{~}") == b"empty"
    assert raw.get(store.prefix + "s:{~~t}") == b"tilde" and raw.get(store.prefix + "s:{~}t}") == b"brace"
    assert dict(store.records()) == expected
    assert dict(store.records("a*[")) == {k: v for k, v in expected.items() if k.startswith("a*[")}
    assert sorted(store.keys("a")) == sorted(k for k in expected if k.startswith("a"))
    assert list(store.keys("a*[1199")) == ["a*[1199]"]
    assert sorted(store.keys("~")) == ["~t"] and sorted(store.keys("}")) == ["}t"]
    assert list(store.keys("zzz")) == [] and list(store.records("zzz")) == []
    records = store.records()
    assert next(records)[0] in expected  # a generator: nothing is read before it is asked for
    records.close()


def test_a_release_that_failed_is_retried_and_a_failed_store_says_redis_was_unreachable(redis_server,
                                                                                         redis_store_url, caplog):
    caplog.set_level(logging.INFO, logger="telesession")
    store = open_store(redis_store_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        token = store.acquire("k", 1)
        redis_server.stop()
        store.release("k", token)  # cannot reach Redis: kept for later
        assert list(store._pending) == [token.lock_key]
        with pytest.raises(StoreError, match="Redis was unreachable while locking"):
            store.acquire("k", 1)
        redis_server.start()  # (no persistence here: test_redis_deployments has the AOF case)
        deadline = time.monotonic() + 10
        while store._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store._pending == {}
        assert any("once Redis answered again" in r.getMessage() for r in caplog.records)
        increment(store, "k")
    finally:
        redis_server.start()
        store.close()


def test_a_master_refusing_writes_for_want_of_replicas_gives_a_store_error(redis_server, redis_store_url):
    """NOREPLICAS (min-replicas-to-write on the server) is a StoreError naming the key, not a raw error."""
    raw = redis_server.client()
    store = open_store(redis_store_url)
    try:
        raw.config_set("min-replicas-to-write", 1)
        with pytest.raises(StoreError, match="NOREPLICAS") as info:
            increment(store, "k")
        assert info.value.key == "k" and not isinstance(info.value, ConflictError)
        raw.config_set("min-replicas-to-write", 0)
        increment(store, "k")  # reconnected and writing again
        assert count_of(store, "k") == 1
    finally:
        raw.config_set("min-replicas-to-write", 0)
        raw.close()
        store.close()
