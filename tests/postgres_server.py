"""A real PostgreSQL server for the tests: initdb'd in a temporary directory, on a free loopback port.

Fixtures (registered in ``conftest.py``):

* ``postgres_server`` (session scope): the running ``PostgresServer``; ``.url``, ``.port``,
  ``.pid``, ``.stop()``, ``.start()``, ``.restart()``, ``.connect()``.
* ``postgres_url`` (function scope): ``postgresql://telesession@127.0.0.1:PORT/telesession``,
  the server (re)started if a previous test stopped it.
* ``postgres_store_url`` (function scope): the same with a fresh ``?table=t_<random>``;
  the table is dropped after the test.

The server binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/N/bin``)
or whatever ``pg_config --bindir`` / ``PATH`` names.  ``initdb`` and ``postgres`` refuse to
run as root, so as root the server runs as the unprivileged user ``nobody`` (the temporary
directory is handed to it).  Without the binaries the PostgreSQL tests are skipped, or fail
when the environment sets ``TELESESSION_REQUIRE_POSTGRES=1`` (CI does:
``apt-get install -y postgresql``).  The server is started and stopped by its PID (SIGINT:
PostgreSQL's fast shutdown), never through a service manager.
"""
import glob
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest

__all__ = ["PostgresServer", "postgres_server", "postgres_url", "postgres_store_url", "require_postgres",
           "find_postgres_bindir", "start_postgres_server"]

REQUIRE_POSTGRES = os.environ.get("TELESESSION_REQUIRE_POSTGRES") == "1"
USER = "telesession"  # the database superuser and the database the tests use
DATABASE = "telesession"


def find_postgres_bindir() -> Optional[str]:
    """The directory holding ``initdb`` and ``postgres``, newest Debian version first; ``None`` if absent."""
    candidates: List[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> float:
        match = re.search(r"/postgresql/(\d+(?:\.\d+)?)/", path)
        return float(match.group(1)) if match else 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))
    for directory in candidates:
        if directory and all(os.access(os.path.join(directory, tool), os.X_OK) for tool in ("initdb", "postgres")):
            return directory
    return None


def _fail_or_skip(message: str) -> None:
    if REQUIRE_POSTGRES:
        pytest.fail(message + " (TELESESSION_REQUIRE_POSTGRES=1)")
    pytest.skip(message)


def require_postgres() -> str:
    """The server's bin directory; skip (or, when required, fail) the test without it or psycopg."""
    bindir = find_postgres_bindir()
    if bindir is None:
        _fail_or_skip("PostgreSQL server binaries (initdb, postgres) not found: apt-get install -y postgresql")
    for module in ("psycopg", "psycopg_pool"):
        if importlib.util.find_spec(module) is None:
            _fail_or_skip(f"the {module} package is not installed: pip install -e .[postgres]")
    return bindir  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One ``postgres`` process in its own temporary directory, fsync off (test data only)."""

    def __init__(self, bindir: str, directory: str, settings: Optional[Dict[str, str]] = None) -> None:
        self.bindir = bindir
        self.directory = directory
        self.datadir = os.path.join(directory, "data")
        self.logfile = os.path.join(directory, "postgres.log")
        self.port = _free_port()
        self.settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                         "max_connections": "200", "shared_buffers": "32MB"}
        self.settings.update(settings or {})
        self.process: Optional["subprocess.Popen[bytes]"] = None
        self._run_as: Dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb and postgres refuse root: run them as nobody
            nobody = pwd.getpwnam("nobody")
            self._run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        os.chmod(directory, 0o700)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.running() else None

    def _run(self, args: List[str], **kwargs: Any) -> "subprocess.CompletedProcess[bytes]":
        return subprocess.run(args, cwd=self.directory, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=120, **self._run_as, **kwargs)

    def initdb(self) -> None:
        done = self._run([os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", USER, "-A", "trust",
                          "-E", "UTF8", "--locale=C", "--no-sync"])
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr).decode('utf-8', 'replace')[-800:]}")

    def start(self, timeout: float = 30.0) -> None:
        """Start on ``self.port`` and wait (at most ``timeout`` s) until it accepts connections."""
        if self.running():
            return
        if not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            self.initdb()
        args = [os.path.join(self.bindir, "postgres"), "-D", self.datadir, "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.directory}"]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        log = open(self.logfile, "ab")
        try:
            self.process = subprocess.Popen(args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, **self._run_as)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode} on port {self.port}: "
                                   f"{self.log_tail()}")
            if self._ready():
                self._create_database()
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections within {timeout:g} s: {self.log_tail()}")

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                                 connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                             autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self, timeout: float = 30.0, *, kill: bool = False) -> None:
        """Stop the server by its PID (SIGINT, fast shutdown; SIGKILL with ``kill``) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:  # a crash: the children (backends) die with the postmaster's process group
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
        if kill:  # a killed postmaster leaves its pid file; the next start must not be refused
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # the backends die too (same process group)
                try:
                    os.killpg(process.pid, 0)
                except OSError:
                    break
                time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def connect(self, **kwargs: Any) -> Any:
        """A plain autocommit psycopg connection to the test database, for looking at what a store wrote."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname=DATABASE, autocommit=True,
                               **kwargs)

    def log_tail(self) -> str:
        try:
            with open(self.logfile, "rb") as log:
                return log.read()[-800:].decode("utf-8", "replace")
        except OSError:
            return ""


def start_postgres_server(settings: Optional[Dict[str, str]] = None) -> PostgresServer:
    """A started ``PostgresServer`` in a new temporary directory (the caller stops it and removes
    ``.directory``); ``RuntimeError`` if it cannot start."""
    bindir = find_postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, postgres) not found: apt-get install -y postgresql")
    directory = tempfile.mkdtemp(prefix="telesession-pg-")
    error: Optional[BaseException] = None
    for _ in range(3):  # the free port may be taken by someone else between probe and bind
        server = PostgresServer(bindir, directory, settings)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            error = exc
            server.stop()
    shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"could not start PostgreSQL: {error}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole test session, stopped (by PID) at the end."""
    require_postgres()
    try:
        server = start_postgres_server()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql://telesession@127.0.0.1:PORT/telesession``, the server (re)started if a test stopped it."""
    postgres_server.start()
    return postgres_server.url


@pytest.fixture
def postgres_store_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The test server's URL with a fresh ``?table=t_<random>``; the table is dropped afterwards."""
    postgres_server.start()
    table = f"t_{secrets.token_hex(4)}"
    yield f"{postgres_server.url}?table={table}"
    postgres_server.start()
    with postgres_server.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
