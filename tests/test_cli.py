"""The ``telesession`` command, run as a user runs it: a child process on real stores in tmp_path.

Sessions are created through the library (``build_record`` + ``store.save``) at the stored keys
the command sees; its exit status, stdout and stderr are checked.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

import pytest

from telesession.records import build_record, encode_data, parse_record
from telesession.stores import from_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FILE_KINDS = ["json", "shelve", "sqlite"]


def url_for(kind: str, tmp_path, name: str = "store") -> str:
    if kind == "json":
        return f"json:{tmp_path / name}"
    if kind == "shelve":
        return f"shelve:{tmp_path / name / 'sessions'}"
    if kind == "sqlite":
        return f"sqlite:{tmp_path / (name + '.sqlite')}"
    raise ValueError(kind)


def run(*args: str, stdin: Optional[str] = None, command: Optional[List[str]] = None,
        cwd=None) -> subprocess.CompletedProcess:
    """Run the command in a child process, with this checkout first on the import path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.pop("COLUMNS", None)
    return subprocess.run([*(command or [sys.executable, "-m", "telesession"]), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=env, cwd=cwd)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The one error line of a failed command (never a traceback)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("telesession: error: "), lines[0]
    return lines[0]


def fill(url: str, sessions: Dict[str, dict]) -> None:
    """Store sessions at exactly the given stored keys, as the records a bot writes (the CLI
    works on stored keys; a bot's manager would add its namespace, "session:1")."""
    for key, data in sessions.items():
        put(url, key, encode_data(data, key, "test"))


def put(url: str, key: str, data_json: str, *, version: int = 0, written: Optional[float] = None,
        ttl: Optional[float] = None) -> bytes:
    """Store a record with a chosen version and write time."""
    record = build_record(key, data_json, version, time.time() if written is None else written)
    store = from_url(url)
    token = store.acquire(key, 5)
    try:
        store.save(key, record, previous=store.load(key), ttl=ttl)
    finally:
        store.release(key, token)
        store.close()
    return record


def records(url: str) -> Dict[str, bytes]:
    """Every raw record of a store, read through the library."""
    store = from_url(url)
    try:
        return {key: store.load(key) for key in store.keys()}
    finally:
        store.close()


def contents(url: str) -> Dict[str, Tuple[object, int, Optional[float]]]:
    return {key: parse_record(raw, key, "test") for key, raw in records(url).items()}


SAMPLE = {"1": {"count": 1}, "-1001234": {"name": "группа", "items": [1, 2.5, None, True]},
          "ключ 1": {"nested": {"a": {"b": []}}}}
OLD = 1_000_000_000.0  # 2001-09-09T01:46:40+00:00


# -- ls, show, stats ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_ls_show_stats(kind, tmp_path):
    url = url_for(kind, tmp_path)
    fill(url, SAMPLE)
    put(url, "old", '{"v":2}', version=2, written=OLD)
    raw = records(url)

    listed = json.loads(ok(run("ls", url, "--json")))
    assert [row["key"] for row in listed] == sorted(raw)
    assert {row["key"]: row["size"] for row in listed} == {k: len(v) for k, v in raw.items()}
    assert {row["key"]: row["version"] for row in listed}["old"] == 2
    assert {row["key"]: row["written"] for row in listed}["old"] == OLD

    assert json.loads(ok(run("show", url, "-1001234"))) == SAMPLE["-1001234"]
    record = json.loads(ok(run("show", url, "old", "--record")))
    assert record == {"version": 2, "written": OLD, "key": "old", "data": {"v": 2}}

    stats = json.loads(ok(run("stats", url, "--json")))
    assert stats["sessions"] == 4
    assert stats["total_bytes"] == sum(len(v) for v in raw.values())
    assert (stats["oldest_key"], stats["oldest_written"]) == ("old", OLD)
    assert stats["newest_written"] > time.time() - 600


def test_ls_and_stats_text(tmp_path):
    url = url_for("json", tmp_path)
    fill(url, SAMPLE)
    put(url, "old", '{"v":2}', written=OLD)
    raw = records(url)
    lines = ok(run("ls", url)).splitlines()
    assert [line.split()[0] for line in lines] == ["-1001234", "1", "old", '"ключ']  # sorted by key
    assert lines[3].startswith('"ключ 1"')  # a key with a space is quoted, so columns stay columns
    assert lines[2].split() == ["old", str(len(raw["old"])), "2001-09-09T01:46:40+00:00"]
    assert datetime.now(timezone.utc).strftime("%Y-%m-%d") in lines[0]

    stats = ok(run("stats", url))
    assert "sessions:        4" in stats
    assert f"total size:      {sum(len(v) for v in raw.values())} bytes" in stats
    assert "oldest written:  2001-09-09T01:46:40+00:00  old" in stats


def test_show_missing_key(tmp_path):
    url = url_for("json", tmp_path)
    fill(url, {"1": {"x": 1}})
    line = fails(run("show", url, "2"))
    assert "no session '2'" in line


# -- rm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_rm(kind, tmp_path):
    url = url_for(kind, tmp_path)
    fill(url, {"a": {"x": 1}, "b": {"x": 2}, "c": {"x": 3}})
    assert "removed 2 sessions" in ok(run("rm", url, "a", "b"))
    assert set(records(url)) == {"c"}

    line = fails(run("rm", url, "c", "nope"))
    assert "no session 'nope'" in line and "1 other session removed" in line
    assert records(url) == {}
    ok(run("rm", url, "nope", "--missing-ok"))


def test_rm_waits_for_the_key_lock(tmp_path):
    """A key that a handler holds is not deleted under it: rm waits, then gives up."""
    url = url_for("json", tmp_path)
    fill(url, {"busy": {"x": 1}})
    store = from_url(url)
    token = store.acquire("busy", 5)
    try:
        started = time.monotonic()
        line = fails(run("rm", url, "busy", "--lock-timeout", "0.3"))
        assert time.monotonic() - started >= 0.3
    finally:
        store.release("busy", token)
    assert "could not lock session 'busy'" in line and "--lock-timeout" in line
    assert set(records(url)) == {"busy"}


def test_rm_removes_a_corrupt_record(tmp_path):
    url = url_for("json", tmp_path)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "bad.json").write_bytes(b"{not json")
    ok(run("rm", url, "bad"))
    assert not (tmp_path / "store" / "bad.json").exists()


# -- export and import ----------------------------------------------------------------------------


def test_export_import_round_trip(tmp_path):
    src = url_for("json", tmp_path, "src")
    fill(src, SAMPLE)
    put(src, "old", '{"v":[1,{"w":null}]}', version=3, written=OLD)

    exported = ok(run("export", src))
    lines = [json.loads(line) for line in exported.splitlines()]
    assert [entry["key"] for entry in lines] == sorted(records(src))
    assert lines[2] == {"key": "old", "version": 3, "written": OLD, "data": {"v": [1, {"w": None}]}}

    out = tmp_path / "backup.jsonl"
    result = run("export", src, "-o", str(out))
    ok(result)
    assert "exported 4 sessions" in result.stderr
    assert out.read_text(encoding="utf-8") == exported
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    dst = url_for("shelve", tmp_path, "dst")
    assert "imported 4 sessions" in ok(run("import", dst, str(out)))
    assert contents(dst) == contents(src)
    assert records(dst) == records(src)  # the very same bytes, write times included
    assert parse_record(from_url(dst).load("-1001234"), "-1001234", "dst")[0] == SAMPLE["-1001234"]

    # the same again: nothing to do; from stdin this time
    assert "imported 0 sessions (4 unchanged)" in ok(run("import", dst, "-", stdin=exported))


@pytest.mark.parametrize("kind", ["shelve", "sqlite"])
def test_import_conflicts(kind, tmp_path):
    url = url_for(kind, tmp_path)
    fill(url, {"a": {"x": 1}, "b": {"x": 2}})
    export = "\n".join([
        json.dumps({"key": "a", "version": 0, "written": OLD, "data": {"x": 1}}),   # same data
        json.dumps({"key": "b", "version": 0, "written": OLD, "data": {"x": 20}}),  # different
        json.dumps({"key": "c", "data": {"x": 3}}),                                 # new
    ]) + "\n"
    before = records(url)

    line = fails(run("import", url, stdin=export))
    assert "'b'" in line and "'a'" not in line and "--overwrite" in line
    assert records(url) == before  # nothing imported, not even "c"

    assert "imported 1 session (1 unchanged, 1 existing skipped)" in ok(
        run("import", url, "--skip-existing", stdin=export))
    assert contents(url)["b"][0] == {"x": 2} and contents(url)["c"][0] == {"x": 3}

    ok(run("import", url, "--overwrite", stdin=export))
    assert contents(url)["b"] == ({"x": 20}, 0, OLD)
    assert run("import", url, "--overwrite", "--skip-existing", stdin=export).returncode == 2


def test_import_validates_every_line_first(tmp_path):
    url = url_for("json", tmp_path)
    good = json.dumps({"key": "a", "data": {"x": 1}})
    cases = {
        "not json": "line 2: not JSON",
        '{"data": {}}': 'line 2: no "key"',
        json.dumps({"key": "z", "data": {}, "extra": 1}): "unexpected field 'extra'",
        '{"key": "b", "data": {"x": 1e999}}': "line 2: session 'b' cannot be stored: session[\"x\"] is inf",
        good: "line 2: key 'a' already appeared on line 1",
    }
    for bad, expected in cases.items():
        line = fails(run("import", url, stdin=f"{good}\n{bad}\n"))
        assert expected in line and "nothing was imported" in line, line
    assert not (tmp_path / "store").exists()  # not even created


# -- migrate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shelve", "sqlite"])
def test_migrate_copies_verifies_and_refuses_to_overwrite(kind, tmp_path):
    src = url_for("json", tmp_path, "src")
    fill(src, SAMPLE)
    put(src, "old", '{"v":1}', version=1, written=OLD)
    dst = url_for(kind, tmp_path, "dst")

    assert ok(run("migrate", src, dst)).strip() == "copied 4 sessions, verified"
    assert records(dst) == records(src)

    put(dst, "1", '{"count":99}')
    changed = records(dst)
    line = fails(run("migrate", src, dst))
    assert "'1'" in line and "nothing was copied" in line and "--overwrite" in line
    assert records(dst) == changed

    assert "copied 4 sessions, verified" in ok(run("migrate", src, dst, "--overwrite"))
    assert records(dst) == records(src)

    assert "same store" in fails(run("migrate", src, src))


def test_migrate_that_fails_midway_says_the_destination_is_partial(tmp_path):
    src, dst = url_for("json", tmp_path, "src"), url_for("json", tmp_path, "dst")
    fill(src, {k: {"k": k} for k in "abcd"})
    store = from_url(dst)
    token = store.acquire("c", 5)  # a running bot holds "c" in the destination
    try:
        line = fails(run("migrate", src, dst, "--lock-timeout", "0.2"))
    finally:
        store.release("c", token)
        store.close()
    assert "after copying 2 of 4 sessions" in line and "PARTIAL" in line
    assert set(records(dst)) == {"a", "b"}
    assert "copied 4 sessions, verified" in ok(run("migrate", src, dst))  # re-running completes it


def test_migrate_refuses_a_corrupt_source_before_copying(tmp_path):
    src, dst = url_for("json", tmp_path, "src"), url_for("json", tmp_path, "dst")
    fill(src, {"a": {"x": 1}})
    (tmp_path / "src" / "bad.json").write_bytes(b"\x00garbage")
    line = fails(run("migrate", src, dst))
    assert "'bad'" in line and "nothing was copied" in line
    assert not (tmp_path / "dst").exists()


@pytest.mark.redis
def test_migrate_to_redis(tmp_path, redis_store_url):
    src = url_for("json", tmp_path)
    fill(src, SAMPLE)
    assert "copied 3 sessions, verified" in ok(run("migrate", src, redis_store_url))
    assert records(redis_store_url) == records(src)
    assert [row["key"] for row in json.loads(ok(run("ls", redis_store_url, "--json")))] == sorted(SAMPLE)


# -- purge-expired --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_purge_expired(kind, tmp_path):
    url = url_for(kind, tmp_path)
    fill(url, {"fresh": {"x": 1}})
    put(url, "stale", '{"x":2}', written=time.time() - 7200)
    put(url, "ancient", '{"x":3}', written=OLD)
    assert ok(run("purge-expired", url, "--ttl", "3600")).strip() == "removed 2 expired sessions"
    assert set(records(url)) == {"fresh"}


def test_purge_expired_needs_a_ttl_unless_the_store_expires_itself(tmp_path):
    url = url_for("json", tmp_path)
    fill(url, {"a": {}})
    result = run("purge-expired", url)
    assert result.returncode == 2 and "--ttl is required" in result.stderr


def test_purge_expired_uses_the_native_expiry_of_sqlite(tmp_path):
    url = url_for("sqlite", tmp_path)
    put(url, "short", '{"x":1}', ttl=0.01)
    put(url, "forever", '{"x":2}')
    time.sleep(0.05)
    assert ok(run("purge-expired", url)).strip() == "removed 1 expired session"
    assert set(records(url)) == {"forever"}


# -- errors ---------------------------------------------------------------------------------------


def test_bad_url_lists_the_schemes(tmp_path):
    for url in ("nonsense", "ftp://host/x"):
        line = fails(run("ls", url))
        assert "json:PATH" in line and "sqlite:PATH" in line and "redis://" in line


def test_redis_passwords_are_never_printed():
    for args in (["show", "redis://bob:hunter22@127.0.0.1:1/0", "k"],
                 ["ls", "redis://:hunter22@127.0.0.1:1/0"],
                 ["ls", "ftp://bob:hunter22@example.invalid/x"]):
        result = run(*args)
        fails(result)
        assert "hunter22" not in result.stderr + result.stdout
    verbose = run("ls", "redis://:hunter22@127.0.0.1:1/0", "--verbose")
    assert verbose.returncode == 1 and "hunter22" not in verbose.stderr


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_read_only_commands_never_create_a_missing_store(kind, tmp_path):
    url = url_for(kind, tmp_path, "missing")
    for args in (["ls", url], ["show", url, "k"], ["export", url], ["stats", url],
                 ["purge-expired", url, "--ttl", "1"], ["rm", url, "k"]):
        assert "no store at" in fails(run(*args)), args
    assert list(tmp_path.iterdir()) == []
    ok(run("rm", url, "k", "--missing-ok"))


def test_corrupt_record(tmp_path):
    url = url_for("json", tmp_path)
    fill(url, {"good": {"x": 1}})
    (tmp_path / "store" / "bad.json").write_bytes(b'{"data": ')

    assert "session 'bad' is unreadable" in fails(run("show", url, "bad"))
    result = run("ls", url)
    assert "session 'bad' is unreadable" in fails(result)
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["bad", "good"]  # the rest is listed

    out = tmp_path / "backup.jsonl"
    assert "'bad'" in fails(run("export", url, "-o", str(out)))
    assert not out.exists()  # never half a backup
    assert "'bad'" in fails(run("purge-expired", url, "--ttl", "1"))
    assert (tmp_path / "store" / "bad.json").exists()  # never deleted by purge

    verbose = run("show", url, "bad", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith("telesession: error: session 'bad'")


def test_usage_errors_exit_2():
    assert run().returncode == 2
    assert run("ls").returncode == 2
    assert run("rm", "memory://", "k", "--lock-timeout", "soon").returncode == 2


# -- how it is started, and the progress bar ------------------------------------------------------


def test_console_script(tmp_path):
    script = shutil.which("telesession")
    assert script is not None, "the telesession console script is not on PATH: pip install -e ."
    url = url_for("json", tmp_path)
    fill(url, {"42": {"x": 1}})
    assert ok(run("ls", url, command=[script])).split()[0] == "42"
    assert "migrate" in ok(run("--help", command=[script]))
    assert "no store at" in fails(run("stats", url_for("json", tmp_path, "nothing"), command=[script]))


def test_relative_paths_and_keys_that_look_like_options(tmp_path):
    fill(url_for("json", tmp_path, "rel"), {"-100": {"x": 1}})
    assert "removed 1 session" in ok(run("rm", "json:rel", "-100", cwd=tmp_path))


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_only_on_a_terminal(tmp_path):
    url = url_for("json", tmp_path)
    fill(url, {str(i): {"i": i} for i in range(40)})
    out = tmp_path / "out.jsonl"

    piped = run("export", url, "-o", str(out))
    assert "\r" not in ok(piped) + piped.stderr

    master, slave = os.openpty()
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "telesession", "export", url, "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    proc.stdout.close()
    assert b"\rexport: " in seen and b"/40 [" in seen  # tqdm's bar: count, elapsed, rate
    assert seen.rstrip().endswith(b"exported 40 sessions to " + str(out).encode())


# -- corrupt records, hints and refusals (issue 16) ------------------------------------------------


def _store_with_a_corrupt_record(tmp_path) -> str:
    url = url_for("json", tmp_path)
    fill(url, {"good": {"x": 1}, "fine": {"y": 2}})
    (tmp_path / "store" / "bad.json").write_bytes(b'{"data": [1, 2')
    return url


def test_show_record_prints_a_corrupt_record_raw_and_says_why(tmp_path):
    url = _store_with_a_corrupt_record(tmp_path)
    result = run("show", url, "bad", "--record")
    line = fails(result)
    assert result.stdout == '{"data": [1, 2\n'  # byte for byte as stored
    assert "does not parse" in line and "JSONDecodeError" in line and "'bad'" in line
    plain = fails(run("show", url, "bad"))
    assert "--record" in plain


def test_hints_name_the_real_url_and_key(tmp_path):
    url = _store_with_a_corrupt_record(tmp_path)
    for command in (["show", url, "bad"], ["ls", url], ["stats", url], ["export", url]):
        line = fails(run(*command))
        assert f"(telesession rm {url} bad)" in line, line
        assert "URL" not in line.replace(url, ""), line
    (tmp_path / "store" / "needs%20quoting.json").write_bytes(b"{")  # the file of the key "needs quoting"
    assert f"(telesession rm {url} 'needs quoting')" in fails(run("show", url, "needs quoting"))


def test_export_skip_corrupt_lists_what_it_left_out(tmp_path):
    url = _store_with_a_corrupt_record(tmp_path)
    out = tmp_path / "backup.jsonl"
    line = fails(run("export", url, "-o", str(out)))  # the default still stops
    assert "'bad'" in line and "--skip-corrupt" in line and not out.exists()
    result = run("export", url, "-o", str(out), "--skip-corrupt")
    ok(result)
    assert [json.loads(x)["key"] for x in out.read_text().splitlines()] == ["fine", "good"]
    notes = result.stderr.splitlines()
    assert notes[0] == f"telesession: exported 2 sessions to {out}"
    assert notes[1] == "telesession: skipped 1 unreadable session (--skip-corrupt): 'bad'"
    assert notes[2].startswith("telesession:   bad: JSONDecodeError")


def test_migrate_skip_corrupt_copies_the_rest_and_verifies(tmp_path):
    src = _store_with_a_corrupt_record(tmp_path)
    dst = url_for("sqlite", tmp_path, "dst")
    line = fails(run("migrate", src, dst))
    assert "nothing was copied" in line and "--skip-corrupt" in line
    result = run("migrate", src, dst, "--skip-corrupt")
    assert ok(result).strip() == "copied 2 sessions, verified"
    assert "skipped 1 unreadable session (--skip-corrupt): 'bad'" in result.stderr
    assert sorted(records(dst)) == ["fine", "good"]


@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", "inf"])
def test_ttl_errors_say_the_same_thing(value):
    result = run("purge-expired", "memory://", "--ttl", value)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"telesession purge-expired: error: argument --ttl: must be a "
                                              f"number of seconds > 0, not {value!r}")


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_read_only_commands_on_a_file_that_is_not_a_store_never_talk_of_creating(kind, tmp_path):
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0:root:/root:/bin/bash\n")
    url = f"{kind}:{target}"
    for command in (["ls", url], ["show", url, "k"], ["stats", url], ["export", url]):
        line = fails(run(*command))
        assert "creat" not in line and f"cannot read {url}: {target} is" in line, line
    assert sorted(os.listdir(tmp_path)) == ["passwd"]  # nothing made beside it (no lock file)
    assert target.read_text() == "root:x:0:0:root:/root:/bin/bash\n"


def test_import_of_a_missing_file_is_one_line(tmp_path):
    line = fails(run("import", url_for("json", tmp_path), str(tmp_path / "nope.jsonl")))
    assert line == (f"telesession: error: cannot read the export {tmp_path / 'nope.jsonl'}: No such file or "
                    f"directory; nothing was imported")


@pytest.mark.parametrize("data, named", [("[1, 2]", "an array"), ('"text"', "a string"), ("3", "a number"),
                                         ("null", "null")])
def test_import_requires_an_object_as_data(tmp_path, data, named):
    url = url_for("json", tmp_path)
    export = '{"key": "a", "data": {"x": 1}}\n{"key": "b", "data": %s}\n' % data
    line = fails(run("import", url, stdin=export))
    assert f"line 2: \"data\" of 'b' must be a JSON object" in line and f"not {named}" in line
    assert "nothing was imported" in line
    assert not (tmp_path / "store").exists()


def test_import_and_migrate_into_memory_refuse(tmp_path):
    src = url_for("json", tmp_path)
    fill(src, {"a": {"x": 1}})
    line = fails(run("import", "memory://", stdin='{"key": "a", "data": {}}\n'))
    assert "importing into memory:// would keep nothing" in line
    line = fails(run("migrate", src, "memory://"))
    assert "migrating into memory:// would keep nothing" in line


def test_main_called_from_a_program_puts_the_logger_back(tmp_path, capsys):
    """``main`` shows the library's log lines on stderr while a command runs, then leaves the
    ``telesession`` logger as the program had it (a program's own logging keeps working)."""
    from telesession.cli import main

    url = f"sqlite:{tmp_path / 's.db'}"
    with from_url(url) as store:
        store.save("session:1", build_record("session:1", encode_data({"n": 1}, "1", "t"), 0, time.time()))
    logger = logging.getLogger("telesession")
    before = (logger.level, logger.propagate, list(logger.handlers))
    assert main(["ls", url]) == 0
    assert "1" in capsys.readouterr().out
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert main(["show", url, "absent"]) != 0  # a failing command too
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
