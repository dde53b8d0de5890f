"""PostgresStore on a real PostgreSQL server: what the shared contract suite does not cover.

A killed holder, a server restart mid-run, two tables, the schema, expiry, pool limits,
passwords, streaming of keys/records, and the ``telesession`` command on postgresql:// URLs.
(The contract suite in ``test_store_contract.py`` runs over PostgresStore too.)
"""
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid

import pytest
from postgres_server import USER, PostgresServer, require_postgres, start_postgres_server
from support import count_of, increment
from test_cli import fails, fill, ok, put, records, run

from telesession import Sessions, session
from telesession.errors import ConflictError, CorruptSessionError, LockTimeout, StoreError
from telesession.records import build_record
from telesession.stores import from_url

pytestmark = pytest.mark.postgres

fork = multiprocessing.get_context("fork")


def _table(url: str) -> str:
    return url.rpartition("table=")[2]


def _hold(url: str, key: str, ready, seconds: float) -> None:
    """Child-process body: hold ``key`` at the store level, then sleep (until killed)."""
    store = from_url(url)
    store.acquire(key, 10)
    ready.set()
    time.sleep(seconds)


def test_a_killed_holder_frees_its_key_within_seconds(postgres_store_url):
    ready = fork.Event()
    child = fork.Process(target=_hold, args=(postgres_store_url, "k", ready, 60))
    child.start()
    try:
        assert ready.wait(30)
        store = from_url(postgres_store_url)
        with pytest.raises(LockTimeout, match="'k'"):
            store.acquire("k", 0.3)
        increment(store, "other")  # other keys are not blocked meanwhile
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        started = time.monotonic()
        increment(store, "k", timeout=30)
        assert time.monotonic() - started < 5
        assert count_of(store, "k") == 1
        store.close()
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_server_restart_mid_run_gives_store_errors_and_exact_totals():
    """Threads increment one key while the server stops and starts again.

    Each update appends its own id: every update that returned is stored exactly once,
    updates that failed before saving are not, and the count equals the ids stored (no
    update lost or applied twice).  A failure while saving may or may not have committed.
    """
    require_postgres()
    server = start_postgres_server()  # its own server: the session's keeps running for others
    try:
        url = f"{server.url}?table=restart"
        sessions = Sessions(from_url(url, timeout=2), initial=lambda: {"count": 0, "ids": []}, lock_timeout=5)
        succeeded, failed, unknown, errors = [], [], [], []
        stop = threading.Event()

        def work(n: int) -> None:
            i = 0
            while not stop.is_set():
                uid = f"{n}-{i}"
                i += 1
                phase = "before"
                try:
                    with sessions.open("hot"):
                        session["count"] += 1
                        session["ids"].append(uid)
                        phase = "saving"
                    succeeded.append(uid)
                except StoreError as exc:
                    (unknown if phase == "saving" else failed).append(uid)
                    errors.append(exc)
                    time.sleep(0.02)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        before = len(succeeded)
        server.stop()
        time.sleep(1.0)
        during = len(errors)
        server.start()
        deadline = time.monotonic() + 30
        while len(succeeded) < before + 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(30)
        assert before > 0 and during > 0, (before, during)
        assert len(succeeded) >= before + 50, "the store did not recover after the restart"
        for exc in errors:
            assert "session:hot'" in str(exc) and "restart" in str(exc) and not isinstance(exc, CorruptSessionError)
        with sessions.open("hot") as s:
            ids = list(s["ids"])
            assert s["count"] == len(ids) == len(set(ids))
        stored = set(ids)
        assert set(succeeded) <= stored
        assert not stored & set(failed)
        assert stored - set(succeeded) <= set(unknown)
        sessions.store.close()
    finally:
        server.stop()
        import shutil

        shutil.rmtree(server.directory, ignore_errors=True)


def test_server_down_is_a_quick_store_error_and_the_store_recovers(postgres_server, postgres_store_url):
    store = from_url(postgres_store_url)
    increment(store, "k")
    postgres_server.stop()
    try:
        for attempt in range(3):
            started = time.monotonic()
            with pytest.raises(StoreError, match="'k'") as info:
                increment(store, "k")
            assert time.monotonic() - started < 8  # does not wait out the whole pool timeout
            assert "127.0.0.1" in str(info.value)
    finally:
        postgres_server.start()
    increment(store, "k")
    assert count_of(store, "k") == 2
    postgres_server.restart()  # every pooled connection is dead now: each kind of call recovers at once
    assert list(store.keys()) == ["k"]
    postgres_server.restart()
    assert [key for key, _ in store.records()] == ["k"]
    postgres_server.restart()
    assert count_of(store, "k") == 2
    postgres_server.restart()
    increment(store, "k")
    assert count_of(store, "k") == 3
    store.close()


def test_recovery_after_a_long_outage_does_not_wait_for_the_pools_backoff(postgres_server, postgres_store_url):
    """psycopg_pool retries a lost connection 1, 3, 7, 15 ... s after it found it lost: after an
    outage of 9 s its next try is some 5 s away, but the first update after the restart must
    not wait for it."""
    store = from_url(postgres_store_url, timeout=5)
    increment(store, "k")
    postgres_server.stop()
    started = time.monotonic()
    try:
        with pytest.raises(StoreError):
            increment(store, "k")  # the pool finds its connection dead and starts retrying
        time.sleep(max(0.0, started + 9.0 - time.monotonic()))
    finally:
        postgres_server.start()
    started = time.monotonic()
    increment(store, "k")
    assert time.monotonic() - started < 3
    assert count_of(store, "k") == 2
    store.close()


def test_two_tables_stay_apart(postgres_url):
    a_url, b_url = f"{postgres_url}?table=a_{uuid.uuid4().hex[:6]}", f"{postgres_url}?table=b_{uuid.uuid4().hex[:6]}"
    a, b = from_url(a_url), from_url(b_url)
    try:
        increment(a, "k")
        for _ in range(3):
            increment(b, "k")
        increment(b, "only-b")
        assert (count_of(a, "k"), count_of(b, "k")) == (1, 3)
        assert sorted(a.keys()) == ["k"] and sorted(b.keys()) == ["k", "only-b"]
        assert a.location != b.location
        token = a.acquire("k", 1)  # holding k in one table does not lock k in the other
        try:
            done = []
            t = threading.Thread(target=lambda: (increment(b, "k", timeout=5), done.append(1)))
            t.start()
            t.join(10)
            assert done == [1]
        finally:
            a.release("k", token)
    finally:
        for store in (a, b):
            with store._current_pool().connection() as conn:
                conn.execute(f"DROP TABLE {store.table}")
            store.close()


def test_schema_is_created_as_documented(postgres_server, postgres_store_url):
    store = from_url(postgres_store_url)
    store.save("k", b'{"x":1}', ttl=60)
    with postgres_server.connect() as conn:
        columns = conn.execute(
            "SELECT column_name, data_type, is_nullable, collation_name FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position", (_table(postgres_store_url),)).fetchall()
        row = conn.execute(f"SELECT key, record, expires - written FROM {_table(postgres_store_url)}").fetchone()
    assert columns == [("key", "text", "NO", "C"), ("record", "bytea", "NO", None),
                       ("written", "timestamp with time zone", "NO", None),
                       ("expires", "timestamp with time zone", "YES", None)]
    assert row[0] == "k" and bytes(row[1]) == b'{"x":1}' and row[2].total_seconds() == 60
    store.close()


def test_a_foreign_table_is_refused(postgres_server, postgres_url):
    with postgres_server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS foreign_sessions (key text PRIMARY KEY, data jsonb)")
    with pytest.raises(StoreError, match="not telesession's"):
        from_url(f"{postgres_url}?table=foreign_sessions")


def test_odd_table_names_are_quoted(postgres_server, postgres_url):
    name = 'we"ird table; DROP TABLE x'
    store = from_url(postgres_url, table=f"public.{name}")
    try:
        increment(store, "k")
        assert count_of(store, "k") == 1
        assert store.describe("k") == f"row 'k' of table public.{name} at {store.address}"
    finally:
        with postgres_server.connect() as conn:
            conn.execute('DROP TABLE public."we""ird table; DROP TABLE x"')
        store.close()


def test_corrupt_row_names_key_and_table_and_stays(postgres_server, postgres_store_url):
    sessions = Sessions(from_url(postgres_store_url))
    table = _table(postgres_store_url)
    with postgres_server.connect() as conn:
        conn.execute(f"INSERT INTO {table} (key, record, written) VALUES ('session:bad', '\\x00ff'::bytea, now())")
    with pytest.raises(CorruptSessionError) as info:
        with sessions.open("bad"):
            session["x"] = 1
    assert "session:bad'" in str(info.value) and f"table public.{table}" in str(info.value)
    with postgres_server.connect() as conn:
        assert bytes(conn.execute(f"SELECT record FROM {table}").fetchone()[0]) == b"\x00\xff"
    sessions.store.close()


def test_expired_rows_are_ignored_and_purged_but_not_while_held(postgres_server, postgres_store_url):
    store = from_url(postgres_store_url)
    table = _table(postgres_store_url)
    for key in ("live", "gone", "held", "forever"):
        store.save(key, build_record(key, '{"count":1}', 0, time.time()), ttl=None if key == "forever" else 3600)
    with postgres_server.connect() as conn:
        conn.execute(f"UPDATE {table} SET expires = now() - interval '1 second' WHERE key IN ('gone', 'held')")
    assert store.load("gone") is None and store.load("live") is not None
    assert sorted(store.keys()) == ["forever", "live"]
    assert sorted(k for k, _ in store.records()) == ["forever", "live"]
    sessions = Sessions(store, initial=lambda: {"count": 0})
    sessions._namespace = ""  # this test speaks in raw store keys
    with sessions.open("gone") as s:  # an expired row is replaced, not a conflict
        assert s["count"] == 0
        s["count"] = 5
    assert count_of(store, "gone") == 5
    with postgres_server.connect() as conn:
        conn.execute(f"UPDATE {table} SET expires = now() - interval '1 second' WHERE key = 'gone'")
    result = []
    token = store.acquire("held", 5)
    try:
        t = threading.Thread(target=lambda: result.append(store.purge_expired()))
        t.start()
        t.join(30)
    finally:
        store.release("held", token)
    assert result == [1]  # 'gone'; 'held' is in use
    assert store.purge_expired() == 1
    with postgres_server.connect() as conn:
        assert sorted(k for (k,) in conn.execute(f"SELECT key FROM {table}")) == ["forever", "live"]
    assert store.purge_expired(now=time.time() + 7200) == 1  # 'live' runs out within the hour
    store.close()


def test_saves_are_conditional(postgres_store_url):
    store = from_url(postgres_store_url)
    store.save("k", b"one")
    with pytest.raises(ConflictError, match="'k'"):
        store.save("k", b"two")  # previous=None, but a row exists
    with pytest.raises(ConflictError, match="'k'"):
        store.save("k", b"two", previous=b"zero")
    store.save("k", b"two", previous=b"one")
    with pytest.raises(ConflictError):
        store.delete("k", previous=b"one")
    store.delete("k", previous=b"two")
    assert store.load("k") is None
    store.close()


def test_a_full_pool_is_a_store_error_naming_max_size_and_other_keys_go_on(postgres_store_url):
    store = from_url(postgres_store_url, max_size=2, timeout=1)
    first = store.acquire("a", 5)
    try:
        second_done = []
        t = threading.Thread(target=lambda: (store.release("b", store.acquire("b", 5)), second_done.append(1)))
        t.start()
        t.join(10)
        assert second_done == [1]  # a second key still gets a connection
        holder_ready, leave = threading.Event(), threading.Event()

        def hold_b() -> None:
            token = store.acquire("b", 5)
            holder_ready.set()
            leave.wait(30)
            store.release("b", token)

        holder = threading.Thread(target=hold_b)
        holder.start()
        assert holder_ready.wait(10)
        try:
            with pytest.raises(StoreError, match="max_size") as info:
                store.acquire("c", 5)
            assert "'c'" in str(info.value)
        finally:
            leave.set()
            holder.join(10)
        store.release("c", store.acquire("c", 5))  # free again
    finally:
        store.release("a", first)
        store.close()


def test_keys_and_records_stream_across_pages_with_prefixes(postgres_store_url):
    store = from_url(postgres_store_url)
    table = _table(postgres_store_url)
    keys = [f"1:s:{i:05d}" for i in range(1203)] + [f"1:t:{i}" for i in range(7)] + ["1:s", "1;", "2:s:1", "\U0010ffff"]
    with store._current_pool().connection() as conn:
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} (key, record, written) VALUES (%s, %s, now())",
                            [(k, k.encode()) for k in keys])
    assert sorted(store.keys()) == sorted(keys)
    assert sorted(store.keys("1:s:")) == [k for k in sorted(keys) if k.startswith("1:s:")]
    assert sorted(store.keys("1:")) == sorted(k for k in keys if k.startswith("1:"))
    assert list(store.keys("\U0010ffff")) == ["\U0010ffff"]
    got = list(store.records("1:s:"))
    assert len(got) == 1203 and all(record == key.encode() for key, record in got)
    assert len(list(store.records())) == len(keys)
    assert list(store.records("nothing")) == []
    partial = store.keys()
    next(partial)
    partial.close()  # an abandoned iteration gives its connection back
    assert store._current_pool().get_stats()["pool_available"] >= 1
    store.close()


def test_keys_the_server_cannot_hold_are_a_store_error(postgres_store_url):
    store = from_url(postgres_store_url)
    for key in ("nul\x00key", "surrogate\udcff"):
        with pytest.raises(StoreError, match="cannot"):
            increment(store, key)
    increment(store, "fine")
    store.close()


def test_passwords_never_reach_messages_or_logs(postgres_server, caplog):
    url = f"postgresql://{USER}:hunter22secret@127.0.0.1:{postgres_server.port}/telesession?table=pw_test"
    caplog.set_level(logging.DEBUG)
    store = from_url(url)  # trust authentication: any password connects
    try:
        texts = [repr(store), store.describe("k"), str(store.location)]
        increment(store, "k")
    finally:
        with store._current_pool().connection() as conn:
            conn.execute("DROP TABLE pw_test")
        store.close()
    down = f"postgresql://{USER}:hunter22secret@127.0.0.1:1/telesession"
    with pytest.raises(StoreError) as info:
        from_url(down)
    texts.append(str(info.value))
    texts += [record.getMessage() for record in caplog.records]
    assert texts and not [t for t in texts if "hunter22" in t]
    result = run("ls", down, "--verbose")
    assert result.returncode == 1 and "hunter22" not in result.stderr + result.stdout


def test_a_given_pool_is_used_and_not_closed(postgres_url):
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(postgres_url.replace("postgresql", "postgres", 1), min_size=1, max_size=3, open=True)
    try:
        store = from_url(postgres_url)  # make the table exist under the default name
        store.close()
        from telesession.stores import PostgresStore

        mine = PostgresStore(pool, table="telesession_sessions")
        sessions = Sessions(mine, initial=lambda: {"count": 0})
        for _ in range(3):
            with sessions.open("k"):
                session["count"] += 1
        mine.close()
        with pool.connection() as conn:
            assert not conn.autocommit  # handed back as it was lent
            assert conn.execute("SELECT count(*) FROM telesession_sessions WHERE key = 'session:k'").fetchone()[0] == 1
            conn.execute("DROP TABLE telesession_sessions")
    finally:
        pool.close()


def test_postgres_scheme_and_importing_telesession_does_not_import_psycopg(postgres_url):
    import subprocess
    import sys

    code = "import sys, telesession, telesession.stores, telesession.cli; print('psycopg' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    store = from_url(postgres_url.replace("postgresql://", "postgres://") + "?table=scheme_test&max_size=3")
    assert type(store).__name__ == "PostgresStore" and store.max_size == 3 and store.table == "scheme_test"
    with store._current_pool().connection() as conn:
        conn.execute("DROP TABLE scheme_test")
    store.close()


# -- the telesession command on postgresql:// URLs -------------------------------------------------

SAMPLE = {"1": {"count": 1}, "-1001234": {"name": "группа"}, "ключ 1": {"nested": {"a": []}}}


def test_cli_ls_show_stats_rm(postgres_store_url):
    url = postgres_store_url
    fill(url, SAMPLE)
    put(url, "old", '{"v":2}', version=2, written=1_000_000_000.0)
    listed = json.loads(ok(run("ls", url, "--json")))
    assert [row["key"] for row in listed] == sorted([*SAMPLE, "old"])
    assert json.loads(ok(run("show", url, "-1001234"))) == SAMPLE["-1001234"]
    stats = json.loads(ok(run("stats", url, "--json")))
    assert stats["sessions"] == 4 and stats["oldest_key"] == "old"
    ok(run("rm", url, "1"))
    assert sorted(records(url)) == sorted(["-1001234", "ключ 1", "old"])
    assert "no table" in fails(run("ls", url.rpartition("=")[0] + "=missing_table"))


def test_cli_export_import_migrate_both_ways(postgres_store_url, tmp_path):
    url = postgres_store_url
    fill(url, SAMPLE)
    dump = ok(run("export", url))
    sqlite = f"sqlite:{tmp_path / 'copy.sqlite'}"
    assert "imported 3" in ok(run("import", sqlite, "-", stdin=dump))
    assert records(sqlite) == records(url)
    back = f"{url}_back"
    try:
        assert "copied 3 sessions, verified" in ok(run("migrate", sqlite, back))
        assert records(back) == records(url)
        other = f"sqlite:{tmp_path / 'other.sqlite'}"
        assert "copied 3 sessions, verified" in ok(run("migrate", back, other))
        assert records(other) == records(url)
    finally:
        store = from_url(back)
        with store._current_pool().connection() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {store.table}")
        store.close()


def test_cli_purge_expired_uses_the_expires_column(postgres_server, postgres_store_url):
    url = postgres_store_url
    put(url, "short", '{"x":1}', ttl=3600)
    put(url, "forever", '{"x":2}')
    with postgres_server.connect() as conn:
        conn.execute(f"UPDATE {_table(url)} SET expires = now() - interval '1 second' WHERE key = 'short'")
    assert ok(run("purge-expired", url)).strip() == "removed 1 expired session"
    with postgres_server.connect() as conn:
        assert [k for (k,) in conn.execute(f"SELECT key FROM {_table(url)}")] == ["forever"]
    put(url, "stale", '{"x":3}', written=time.time() - 7200)
    assert ok(run("purge-expired", url, "--ttl", "3600")).strip() == "removed 1 expired session"
    assert set(records(url)) == {"forever"}


def test_server_fixture_runs_as_documented(postgres_server: PostgresServer):
    assert postgres_server.running() and postgres_server.pid
    with postgres_server.connect() as conn:
        assert conn.execute("SELECT current_setting('listen_addresses')").fetchone()[0] == "127.0.0.1"
