"""RedisStore on the deployments bots outgrow one server with: a 3-master Redis Cluster, a Sentinel
failover under load with ``wait_replicas=1``, a restart with AOF, Valkey clients; all real servers."""
import importlib.util
import json
import logging
import os
import secrets
import threading
import time
from typing import Any, Dict, List, Set

import pytest

from telesession import Sessions
from telesession.errors import ConflictError, LockTimeout, StoreError
from telesession.stores import from_url

from support import count_of, increment  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.redis

if importlib.util.find_spec("redis") is None and os.environ.get("TELESESSION_REQUIRE_REDIS") != "1":
    pytest.skip("the redis package is not installed: pip install -e .[redis]", allow_module_level=True)

from redis_server import CLUSTER_BUS_OFFSET, RedisServer, _free_port, start_server, wait_until  # noqa: E402

# Thirty keys: digits, braces in every position, the empty key, and the layout's escape character.
KEYS30 = [str(i) for i in range(18)] + ["{", "}", "{}", "}{", "{x}", "a{b}c", "}x", "x}", "", "~", "~x", "-100123:7"]
assert len(KEYS30) == 30


def _store(target: Any, **options: Any):
    from telesession.stores.redis import RedisStore

    return RedisStore(target, **options)


def _threads(count: int, body: Any) -> List[BaseException]:
    """Run ``body(i)`` in ``count`` threads; the exceptions they raised."""
    failures: List[BaseException] = []

    def run(i: int) -> None:
        try:
            body(i)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return failures


# -- Redis Cluster -------------------------------------------------------------------------

@pytest.fixture(params=["url", "client"])
def cluster_store(request, redis_cluster):
    """A store on the cluster with a fresh prefix, made from a URL or from a RedisCluster client."""
    prefix = f"t-{secrets.token_hex(4)}:"
    client = None
    if request.param == "url":
        store = from_url(f"{redis_cluster.url}?prefix={prefix}")
    else:
        client = redis_cluster.client()
        store = _store(client, prefix=prefix)
    yield store
    store.close()
    if client is not None:
        client.close()
    for node in redis_cluster.nodes:
        if node.running():
            raw = node.client()
            for name in raw.scan_iter(match=prefix + "*", count=1000):
                raw.delete(name)
            raw.close()


def _records_per_master(redis_cluster, prefix: str) -> List[int]:
    counts = []
    for node in redis_cluster.nodes:
        raw = node.client()
        counts.append(sum(1 for _ in raw.scan_iter(match=prefix + "s:*", count=1000)))
        raw.close()
    return counts


def test_cluster_nodes_get_ports_whose_bus_port_can_exist():
    """A node listens on its port + 10000 too and exits on a port above 55535: the fixture never picks one."""
    ports = [_free_port(cluster=True) for _ in range(300)]
    assert max(ports) + CLUSTER_BUS_OFFSET <= 65535, max(ports)


@pytest.mark.redis_topology
def test_cluster_threads_lose_nothing_and_sessions_spread(cluster_store, redis_cluster):
    from redis.crc import key_slot

    store = cluster_store
    for key in KEYS30:  # a session's lock and record share a slot, whatever the key
        assert key_slot(store._session_key(key)) == key_slot(store._lock_key(key)), key
    failures = _threads(8, lambda t: [increment(store, KEYS30[(t * 7 + i) % 30]) for i in range(100)])
    assert failures == []
    counts = {key: count_of(store, key) for key in KEYS30}
    assert sum(counts.values()) == 800
    expected = {key: sum(1 for t in range(8) for i in range(100) if (t * 7 + i) % 30 == n)
                for n, key in enumerate(KEYS30)}
    assert counts == expected
    per_master = _records_per_master(redis_cluster, store.prefix)
    assert sum(per_master) == 30 and sum(1 for c in per_master if c) >= 2, per_master
    assert sorted(store.keys()) == sorted(KEYS30)
    assert dict(store.records()) == {key: store.load(key) for key in KEYS30}
    assert sorted(store.keys("}")) == ["}", "}x", "}{"] and sorted(store.keys("~")) == ["~", "~x"]
    assert sorted(k for k, _ in store.records("{")) == ["{", "{x}", "{}"]


@pytest.mark.redis_topology
def test_cluster_slow_handlers_keep_their_leases(redis_cluster):
    """Handlers three leases long on keys in many slots: renewal (one script per slot) keeps every lock."""
    prefix = f"t-{secrets.token_hex(4)}:"
    store = from_url(f"{redis_cluster.url}?prefix={prefix}&lease=0.6")
    try:
        sessions = Sessions(store, initial=lambda: {"n": 0}, lock_timeout=30)
        keys = [f"slow-{i}" for i in range(12)]
        assert len({store._slot(store._lock_key(k)) for k in keys}) >= 6

        def handler(t: int) -> None:
            for _ in range(2):
                for key in keys[t * 3:(t + 1) * 3]:
                    with sessions.open(key) as s:
                        time.sleep(0.6)  # with 3 keys: the first lock is held 1.8 s, three leases
                        s["n"] += 1

        started = time.monotonic()
        failures = _threads(4, handler)
        assert failures == [], failures  # no ConflictError: every lease was renewed
        assert time.monotonic() - started >= 3.6
        for key in keys:
            with sessions.open(key) as s:
                assert s["n"] == 2
    finally:
        store.close()


@pytest.mark.redis_topology
def test_cluster_errors_are_store_errors_and_renewal_survives_a_node_outage(redis_cluster, caplog):
    from redis.exceptions import RedisClusterException

    with pytest.raises(StoreError, match="Redis was unreachable") as info:  # nothing listens there
        from_url(f"redis+cluster://127.0.0.1:{_free_port()}", socket_connect_timeout=1)
    assert isinstance(info.value.__cause__, RedisClusterException)  # not a RedisError, wrapped all the same

    prefix = f"t-{secrets.token_hex(4)}:"
    store = from_url(f"{redis_cluster.url}?prefix={prefix}&lease=1", socket_timeout=1, socket_connect_timeout=1)
    caplog.set_level(logging.WARNING, logger="telesession")
    down = redis_cluster.nodes[0]
    owner = {n.port: n for n in redis_cluster.nodes}

    def node_of(key: str) -> Any:
        return owner[store.client.get_node_from_key(store._session_key(key)).port]

    keys = [f"k{i}" for i in range(40)]
    on_down = next(k for k in keys if node_of(k) is down)
    on_up = next(k for k in keys if node_of(k) is not down)
    try:
        increment(store, on_up)
        held_down = store.acquire(on_down, 5)
        held_up = store.acquire(on_up, 5)
        before_down, before_up = store.load(on_down), store.load(on_up)
        down.stop()
        try:
            with pytest.raises(StoreError) as info:
                store.load(on_down)
            assert not isinstance(info.value, (ConflictError, LockTimeout))
            assert "Redis was unreachable" in str(info.value) and on_down in str(info.value)
            assert "redis+cluster://" in str(info.value)
            time.sleep(2.5)  # 2.5 leases: only renewal keeps the live node's lock
            renewer = store._renewer
            assert renewer is not None and renewer.is_alive()
            store.save(on_up, json.dumps({"data": {"count": 41}}).encode(), previous=before_up)
        finally:
            down.start()
            redis_cluster.wait_ok()
        store.release(on_up, held_up)
        with pytest.raises(ConflictError, match="Redis was unreachable"):
            store.save(on_down, b"late", previous=before_down)  # its lease could not be renewed
        store.release(on_down, held_down)
        assert any("Redis was unreachable" in r.getMessage() for r in caplog.records)
        assert count_of(store, on_up) == 41
        increment(store, on_down)  # the node is back, without its data: a fresh session
        increment(store, on_up)
        assert count_of(store, on_down) == 1 and count_of(store, on_up) == 42
    finally:
        for key in (on_down, on_up):
            try:
                store.delete(key)
            except StoreError:
                pass
        store.close()


def test_cluster_options_that_cannot_work_are_refused(redis_cluster):
    with pytest.raises(ValueError, match="wait_replicas"):
        from_url(redis_cluster.url + "?wait_replicas=1")
    with pytest.raises(ValueError, match="flat"):
        from_url(redis_cluster.url + "?layout=flat")
    with pytest.raises(ValueError, match="database 0"):
        from_url(redis_cluster.url + "/3")
    with pytest.raises(ValueError, match="hash tag"):
        from_url(redis_cluster.url + "?prefix=half{tag:")
    with pytest.raises(ValueError, match=r"redis\+cluster://"):  # redis-py would fail later with a TypeError
        from_url(f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/0?cluster=true")
    with pytest.raises(ValueError, match="HOST:PORT"):
        from_url("redis+cluster://127.0.0.1:notaport")
    with pytest.raises(ValueError, match="SERVICE"):
        from_url("redis+sentinel://127.0.0.1:26379")
    whole = from_url(redis_cluster.url + "?prefix={bot}:")  # a complete tag of its own: one slot
    try:
        assert len({whole._slot(whole._session_key(k)) for k in KEYS30}) == 1
        increment(whole, "k")
        assert count_of(whole, "k") == 1
        whole.delete("k")
    finally:
        whole.close()


# -- Sentinel --------------------------------------------------------------------------------

@pytest.mark.redis_topology
def test_sentinel_url_and_master_for_client_name_the_service(redis_sentinel):
    from redis.sentinel import Sentinel

    prefix = f"t-{secrets.token_hex(4)}:"
    by_url = from_url(redis_sentinel.url(f"/0?prefix={prefix}&wait_replicas=1"))
    sentinel = Sentinel([("127.0.0.1", s.port) for s in redis_sentinel.sentinels], socket_timeout=5)
    client = sentinel.master_for("mymaster", socket_timeout=5)
    by_client = _store(client, prefix=prefix, wait_replicas=1)
    by_valkey = from_url(redis_sentinel.url(f"/0?prefix={prefix}&wait_replicas=1").replace("redis+", "valkey+"))
    try:
        assert by_url.location == by_client.location == by_valkey.location
        for store in (by_url, by_client, by_valkey):
            where = store.describe("k")
            assert "mymaster" in where and "+sentinel://" in where
            assert all(f"127.0.0.1:{s.port}" in where for s in redis_sentinel.sentinels)
            for _ in range(5):
                increment(store, "k")
        assert count_of(by_url, "k") == 15
        replica = redis_sentinel.server_on(next(s.port for s in redis_sentinel.servers
                                                if s.port != redis_sentinel.master_port()))
        raw = replica.client()
        assert json.loads(raw.get(by_url._session_key("k")))["data"]["count"] == 15  # on the replica already
        raw.close()
        by_url.delete("k")
    finally:
        by_url.close()
        by_client.close()
        by_valkey.close()
        client.close()


def test_wait_replicas_without_replicas_raises_store_error(redis_store_url):
    store = from_url(redis_store_url + "&wait_replicas=1", socket_timeout=0.4)
    try:
        with pytest.raises(StoreError, match=r"0 of 1") as info:
            increment(store, "k")
        assert info.value.key == "k" and "wait_replicas=1" in str(info.value)
        assert not isinstance(info.value, ConflictError)
        assert store.load("k") is not None  # written, not confirmed: never reported as saved
        with pytest.raises(ValueError, match="wait_replicas"):
            from_url(redis_store_url + "&wait_replicas=-1")
    finally:
        store.close()


@pytest.mark.redis_topology
def test_a_sentinel_failover_under_load_loses_no_acknowledged_update(redis_sentinel):
    """Threads append operation ids while Sentinel fails the master over: every id whose update
    returned is there afterwards, none twice, none that was never attempted."""
    redis_sentinel.wait_ready()
    prefix = f"t-{secrets.token_hex(4)}:"
    url = redis_sentinel.url(f"?prefix={prefix}&wait_replicas=1&lease=5")
    store = from_url(url, socket_timeout=2, socket_connect_timeout=2)
    sessions = Sessions(store, initial=lambda: {"ids": []}, lock_timeout=10)
    keys = [f"chat-{i}" for i in range(12)]
    acked: Dict[str, float] = {}
    attempted: Set[str] = set()
    errors: Dict[str, int] = {}
    unexpected: List[BaseException] = []
    stop = threading.Event()
    guard = threading.Lock()

    def worker(t: int) -> None:
        i = 0
        while not stop.is_set():
            op, key = f"{t}-{i}", keys[(t * 5 + i) % len(keys)]
            i += 1
            with guard:
                attempted.add(op)
            try:
                with sessions.open(key) as s:
                    s["ids"].append(op)
            except (StoreError, ConflictError, LockTimeout) as exc:
                with guard:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                time.sleep(0.01)
                continue
            except BaseException as exc:  # anything else is a failure of the test
                unexpected.append(exc)
                return
            with guard:
                acked[op] = time.monotonic()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acked) >= 150, 120, "150 updates before the failover")
        old_port = redis_sentinel.failover()
        wait_until(lambda: redis_sentinel.master_port() != old_port, 60, "Sentinel to name a new master")
        switched = time.monotonic()
        wait_until(lambda: sum(1 for at in acked.values() if at > switched) >= 100, 120,
                   "100 updates acknowledged after the switch")
        first_after = min(at for at in acked.values() if at > switched)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert unexpected == []
    assert first_after - switched < 30  # new updates succeed soon after the failover
    store.close()

    check = from_url(url)
    try:
        stored: List[str] = []
        for key in keys:
            raw = check.load(sessions._stored_key(key))
            if raw is not None:
                stored.extend(json.loads(raw)["data"]["ids"])
    finally:
        check.close()
    lost = set(acked) - set(stored)
    duplicated = len(stored) - len(set(stored))
    phantom = set(stored) - attempted
    assert (len(lost), duplicated, len(phantom)) == (0, 0, 0), (sorted(lost)[:20], errors)
    print(f"failover: {len(acked)} acknowledged, {len(attempted) - len(acked)} failed {errors}, "
          f"first success {first_after - switched:.2f} s after the switch")


# -- restarts --------------------------------------------------------------------------------

@pytest.fixture
def aof_server(tmp_path):
    """A server of its own with AOF (fsync always): locks survive its restart, like in production."""
    from redis_server import require_redis

    server = start_server(require_redis(), str(tmp_path / "aof"), aof=True)
    yield server
    server.stop()


def test_locks_released_during_an_outage_do_not_outlive_the_restart(aof_server: RedisServer, caplog):
    store = from_url(f"{aof_server.url}?prefix=p:", socket_timeout=1, socket_connect_timeout=1)
    caplog.set_level(logging.INFO, logger="telesession")
    sessions = Sessions(store, initial=lambda: {"n": 0}, lock_timeout=5)
    keys = [f"chat-{i}" for i in range(6)]
    for key in keys:
        with sessions.open(key) as s:
            s["n"] += 1
    inside, outage = threading.Barrier(len(keys) + 1), threading.Event()
    caught: List[BaseException] = []

    def handler(i: int) -> None:
        try:
            with sessions.open(keys[i]) as s:
                s["n"] += 1
                inside.wait(30)
                outage.wait(30)
        except StoreError as exc:
            caught.append(exc)

    threads = [threading.Thread(target=handler, args=(i,)) for i in range(len(keys))]
    for thread in threads:
        thread.start()
    inside.wait(30)
    aof_server.stop()  # the handlers finish while Redis is down: neither save nor release gets through
    outage.set()
    for thread in threads:
        thread.join(60)
    assert len(caught) == len(keys)
    assert all("Redis was unreachable" in str(exc) for exc in caught), [str(e) for e in caught]
    aof_server.start()  # AOF brings back the six locks with 30 s leases
    back = time.monotonic()
    raw = aof_server.client()
    try:
        wait_until(lambda: not list(raw.scan_iter(match="p:l:*")), 20, "the stale locks to be released")
        assert time.monotonic() - back < 10  # not the 30 s lease
        other = Sessions(from_url(f"{aof_server.url}?prefix=p:"), initial=lambda: {"n": 0}, lock_timeout=5)
        for key in keys:
            with other.open(key) as s:
                assert s["n"] == 1  # the outage's updates failed and said so
                s["n"] += 1
        other.store.close()
    finally:
        raw.close()
        store.close()
    assert any("once Redis answered again" in r.getMessage() for r in caplog.records)


# -- Valkey ----------------------------------------------------------------------------------

def test_valkey_clients_work_and_their_errors_are_store_errors(valkey_server):
    import valkey

    client = valkey.Valkey(host="127.0.0.1", port=valkey_server.port, socket_timeout=5)
    store = _store(client, prefix=f"t-{secrets.token_hex(4)}:")
    try:
        assert failures_of(lambda t: [increment(store, f"k{i % 3}") for i in range(50)]) == []
        assert [count_of(store, f"k{i}") for i in range(3)] == [68, 68, 64]
        assert store.address == f"valkey://127.0.0.1:{valkey_server.port}/0"
        for i in range(3):
            store.delete(f"k{i}")
    finally:
        store.close()
        client.close()
    dead = _free_port()
    for target in (valkey.Valkey(host="127.0.0.1", port=dead, socket_connect_timeout=1),
                   f"valkey://127.0.0.1:{dead}/0"):
        store = from_url(target, socket_connect_timeout=1) if isinstance(target, str) else _store(target)
        for call in (lambda: store.load("k"), lambda: increment(store, "k"), lambda: list(store.keys())):
            with pytest.raises(StoreError, match="Redis was unreachable") as info:
                call()
            assert f"127.0.0.1:{dead}" in str(info.value)
            assert isinstance(info.value.__cause__, valkey.exceptions.ValkeyError)
        store.close()


def failures_of(body: Any) -> List[BaseException]:
    return _threads(4, body)


# -- moving data -------------------------------------------------------------------------------

@pytest.mark.redis_topology
def test_cli_migrate_moves_sessions_of_the_0_1_layout_to_the_tagged_one_and_to_a_cluster(
        redis_store_url, redis_server, redis_cluster, capsys):
    from telesession.cli import main

    prefix = redis_store_url.split("prefix=", 1)[1]
    raw = redis_server.client()
    keys = ["123", "-100777:5", "odd{", ""]  # ("{x}" is ambiguous in the old layout: see the docs)
    with from_url(redis_store_url) as tagged:
        records = {key: json.dumps({"v": 1, "data": {"count": i}}).encode() for i, key in enumerate(keys)}
    try:
        for key, record in records.items():  # what telesession 0.1 wrote: {prefix}s:KEY, no braces
            raw.set(f"{prefix}s:{key}", record)
        flat_url = redis_store_url + "&layout=flat"
        with from_url(flat_url) as flat:
            assert sorted(flat.keys()) == sorted(keys) and flat.load("123") == records["123"]
        assert main(["migrate", flat_url, redis_store_url]) == 0  # the same server, the new layout
        cluster_url = f"{redis_cluster.url}?prefix={prefix}"
        assert main(["migrate", redis_store_url, cluster_url]) == 0
        for url in (redis_store_url, cluster_url):
            with from_url(url) as store:
                assert dict(store.records()) == records
                assert raw.get(f"{prefix}s:{{123}}") == records["123"]  # plain GET of the record key
        with from_url(cluster_url) as store:
            for key in keys:
                store.delete(key)
    finally:
        raw.close()
