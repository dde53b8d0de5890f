"""A real ``redis-server`` for the tests: started on a free loopback port, stoppable and restartable.

Fixtures (registered in ``conftest.py``):

* ``redis_server`` (session scope): the running ``RedisServer``; ``.url``, ``.port``,
  ``.stop()``, ``.start()``, ``.restart()``, ``.client()``.
* ``redis_url`` (function scope): ``redis://127.0.0.1:PORT/0``, the server (re)started if
  a previous test stopped it; add a ``?prefix=`` of your own.
* ``redis_store_url`` (function scope): the same with a fresh ``?prefix=t-<random>:``;
  the prefix's keys are removed after the test.

Without ``redis-server`` the Redis tests are skipped, or fail when the environment sets
``TELESESSION_REQUIRE_REDIS=1`` (CI does: ``apt-get install -y redis-server``).
"""
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Iterator, Optional

import pytest

if TYPE_CHECKING:  # pragma: no cover
    import redis

__all__ = ["RedisServer", "redis_server", "redis_url", "redis_store_url", "require_redis"]

REQUIRE_REDIS = os.environ.get("TELESESSION_REQUIRE_REDIS") == "1"


def require_redis() -> str:
    """The path of ``redis-server``; skip (or, when required, fail) the test without it."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server not installed: apt-get install -y redis-server"
        if REQUIRE_REDIS:
            pytest.fail(message + " (TELESESSION_REQUIRE_REDIS=1)")
        pytest.skip(message)
    if importlib.util.find_spec("redis") is None:
        message = "the redis package is not installed: pip install -e .[redis]"
        if REQUIRE_REDIS:
            pytest.fail(message + " (TELESESSION_REQUIRE_REDIS=1)")
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process without persistence, in its own temporary directory."""

    def __init__(self, executable: str, directory: str) -> None:
        self.executable = executable
        self.directory = directory
        self.port = _free_port()
        self.process: Optional["subprocess.Popen[bytes]"] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start on ``self.port`` and wait (at most ``timeout`` s) until it answers PING."""
        if self.running():
            return
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        try:
            self.process = subprocess.Popen(
                [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--dir", self.directory],
                cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode} on port "
                                   f"{self.port}: {self.log_tail()}")
            if _ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout:g} s: {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (a real outage for the clients) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> "redis.Redis":
        """A plain redis-py client of db 0, for looking at what a store wrote."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log"), "rb") as log:
                return log.read()[-800:].decode("utf-8", "replace")
        except OSError:
            return ""


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole test session, terminated at the end."""
    executable = require_redis()
    directory = tempfile.mkdtemp(prefix="telesession-redis-")
    server = None
    for _ in range(3):  # the free port may be taken by someone else between probe and bind
        server = RedisServer(executable, directory)
        try:
            server.start()
            break
        except RuntimeError:
            server.stop()
            server = None
    if server is None:
        pytest.fail(f"could not start redis-server in {directory}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of the test server, (re)started if a test stopped it.

    Add ``?prefix=...`` of your own, or use ``redis_store_url``.
    """
    redis_server.start()
    return redis_server.url


@pytest.fixture
def redis_store_url(redis_server: RedisServer) -> Iterator[str]:
    """The test server's URL with a fresh ``?prefix=t-<random>:``; its keys are removed afterwards."""
    redis_server.start()
    prefix = f"t-{secrets.token_hex(4)}:"
    yield f"{redis_server.url}?prefix={prefix}"
    redis_server.start()
    client = redis_server.client()
    try:
        for name in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(name)
    finally:
        client.close()
