"""The store contract (tests/test_store_contract.py) on the other Redis deployments: Valkey, a
3-master Redis Cluster (through the redis and the valkey package) and a Sentinel-managed master
with ``wait_replicas=1``, all by URL."""
import importlib.util
import os
import uuid

import pytest

from test_store_contract import (  # noqa: F401  (collected here again, with the fixtures below)
    test_corrupt_record_raises_and_is_not_overwritten, test_delete_and_keys,
    test_expiry_and_migration_work_on_every_store, test_hostile_keys_stay_distinct_and_inside,
    test_other_process_holding_a_key_times_out_then_a_killed_holder_frees_it, test_processes_on_one_key_lose_nothing,
    test_store_level_threads_lose_nothing, test_threads_on_one_key_lose_nothing,
    test_unserializable_value_leaves_store_unchanged)

pytestmark = pytest.mark.redis

if importlib.util.find_spec("redis") is None and os.environ.get("TELESESSION_REQUIRE_REDIS") != "1":
    pytest.skip("the redis package is not installed: pip install -e .[redis]", allow_module_level=True)

DEPLOYMENTS = ["valkey", pytest.param("cluster", marks=pytest.mark.redis_topology),
               pytest.param("valkey-cluster", marks=pytest.mark.redis_topology),
               pytest.param("sentinel", marks=pytest.mark.redis_topology)]


def _url(request: pytest.FixtureRequest) -> str:
    prefix = f"c-{uuid.uuid4().hex[:8]}:"
    if request.param == "valkey":
        server = request.getfixturevalue("valkey_server")
        server.start()
        return f"valkey://127.0.0.1:{server.port}/0?prefix={prefix}&lease=1"
    if request.param in ("cluster", "valkey-cluster"):
        url = request.getfixturevalue("redis_cluster").url + f"?prefix={prefix}&lease=1"
        return url.replace("redis+", "valkey+") if request.param == "valkey-cluster" else url
    return request.getfixturevalue("redis_sentinel").url() + f"?prefix={prefix}&lease=1&wait_replicas=1"


@pytest.fixture(params=DEPLOYMENTS)
def store_url(request) -> str:
    """A fresh store on each deployment, as a URL (overrides conftest's for this module)."""
    return _url(request)


@pytest.fixture(params=DEPLOYMENTS)
def shared_store_url(request) -> str:
    return _url(request)
