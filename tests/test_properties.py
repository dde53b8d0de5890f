"""Properties over arbitrary input (hypothesis): keys never escape and never collide, values
round-trip exactly or fail with a SerializationError that says where, big sessions work."""
import json
import math
import os
import tempfile
import uuid

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from telesession import Sessions
from telesession.errors import SerializationError
from telesession.stores import from_url
from telesession.stores.jsonfile import JSONFileStore, filename_to_key, key_to_filename

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STORE_IO = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---- keys -------------------------------------------------------------------------------------

WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                   *(f"LPT{i}" for i in range(1, 10))}
RESERVED = [".", "..", "...", "", " ", "/", "\\", "./", "../", "..\\", "a/b", "a\\b", "/etc/passwd",
            "C:\\x", "C:", "~", "~root", "%", "%2F", "%2E%2E", ".json", ".lock", ".1-2.tmp", "a.json",
            "\x00", "a\x00b", "CON", "con", "nul", "NUL", "Nul.txt", "aux", "com1", "LPT9", "prn.json",
            "ab", "AB", "Ab", "é", "e\u0301", "\u212b", "\u00c5", "\ufeff", "\u202e", "🔑", "\r\n",
            "x" * 200, "x" * 201, "x" * 1000, "é" * 100, "é" * 101, "%" * 100, "." * 300]

keys = st.one_of(
    st.sampled_from(RESERVED),
    st.text(),
    st.text(alphabet=st.sampled_from("./\\%~-_:aAzZ09é \x00"), max_size=40),
    st.text(min_size=150, max_size=1000),
    st.builds(lambda a, b: a + b, st.sampled_from(RESERVED), st.text(max_size=20)),
)


def _safe_name(name: str) -> None:
    """A single, ordinary, non-hidden file name that every mainstream filesystem accepts."""
    assert name.endswith(".json")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert len(name.encode("utf-8")) <= 255
    assert all(0x20 < ord(c) < 0x7F for c in name), name  # plain ASCII: no normalization games
    assert not set(name) & set('<>:"|?*'), name
    assert os.path.basename(name) == name and not os.path.isabs(name)


@FAST
@given(keys)
def test_every_key_is_one_safe_file_name_that_maps_back(key):
    name = key_to_filename(key)
    _safe_name(name)
    assert key_to_filename(key) == name  # deterministic
    back = filename_to_key(name)
    if back is None:  # a long key: the name is cut and ends in a hash; the record names the key
        assert "~" in name and len(name) <= 205
    else:
        assert back == key


@FAST
@given(st.lists(keys, min_size=2, max_size=30, unique=True))
def test_distinct_keys_get_distinct_file_names_even_ignoring_case(many):
    names = [key_to_filename(k) for k in many]
    assert len(set(names)) == len(many)
    # case-insensitive filesystems (macOS, Windows) must not merge two sessions either
    assert len({n.lower() for n in names}) == len(many)


@FAST
@given(keys, keys)
def test_two_keys_share_a_file_only_if_equal(a, b):
    assume(a != b)
    assert key_to_filename(a) != key_to_filename(b)
    assert key_to_filename(a).lower() != key_to_filename(b).lower()


@FAST
@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300))
def test_keys_sharing_a_long_prefix_stay_distinct(prefix, tail):
    long_prefix = (prefix * (1000 // len(prefix) + 1))[:900]
    a, b = long_prefix + tail, long_prefix + tail + "x"
    assert key_to_filename(a) != key_to_filename(b)


def test_no_key_becomes_a_windows_device_name():
    for device in sorted(WINDOWS_DEVICES):
        for key in (device, device.lower(), device.capitalize(), device.lower() + ".x"):
            stem = key_to_filename(key).split(".")[0].rstrip(" ")
            assert stem.upper() not in WINDOWS_DEVICES, (key, key_to_filename(key))


@STORE_IO
@given(st.lists(keys, min_size=1, max_size=12, unique=True))
def test_real_saves_stay_inside_the_directory_one_file_per_key(many):
    with tempfile.TemporaryDirectory() as top:
        directory = os.path.join(top, "sessions")
        store = JSONFileStore(directory, fsync=False)
        sessions = Sessions(store)
        for i, key in enumerate(many):
            with sessions.open(key) as s:
                s["i"] = i
        assert sorted(os.listdir(top)) == ["sessions"], "nothing may appear beside the directory"
        entries = [e for e in os.scandir(directory) if e.name not in (".lock", ".lock.d")]  # (either lock backend)
        assert all(e.is_file(follow_symlinks=False) for e in entries)
        assert sorted(e.name for e in entries) == sorted(key_to_filename("session:" + k) for k in many)
        assert sorted(store.keys()) == sorted("session:" + k for k in many)
        assert sorted(sessions.keys()) == sorted(many)
        reader = Sessions(JSONFileStore(directory))
        for i, key in enumerate(many):
            with reader.open(key) as s:
                assert s == {"i": i}
            with open(store.path("session:" + key), "rb") as f:
                assert json.loads(f.read())["key"] == "session:" + key


# ---- values -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=40,
)


def _same(a, b) -> bool:
    """Equal and of the very same types all the way down (1 == 1.0 == True would hide changes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


@pytest.fixture(scope="module")
def store_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("property-stores")


def _url(kind: str, base) -> str:
    return {"memory": "memory://", "json": f"json:{base / 'json'}", "sqlite": f"sqlite:{base / 'db.sqlite'}"}[kind]


def _reader(kind: str, url: str, writer: Sessions) -> Sessions:
    """A second manager over a *fresh* store object: what it reads came from the stored record."""
    return Sessions(writer.store if kind == "memory" else from_url(url))


@pytest.mark.parametrize("kind", ["memory", "json", "sqlite"])
def test_json_values_round_trip_exactly(kind, store_dirs):
    url = _url(kind, store_dirs / f"round-trip-{kind}")
    writer = Sessions(from_url(url) if kind != "json" else JSONFileStore(url[5:], fsync=False))
    reader = _reader(kind, url, writer)
    examples = []

    @STORE_IO
    @given(value=json_values, field=st.text(max_size=20))
    def round_trip(value, field):
        key = uuid.uuid4().hex
        with writer.open(key) as s:
            s[field] = value
        with reader.open(key) as s:
            got = s.__wrapped__
        assert _same(got, {field: value}), (value, got)
        examples.append(1)

    round_trip()
    print(f"round trip through {kind}: {len(examples)} examples")
    assert len(examples) >= 150


BAD_LEAVES = st.one_of(
    st.tuples(st.integers()).map(lambda t: ("tuple", t)),
    st.just(("tuple", ())),
    st.frozensets(st.integers(), max_size=3).map(lambda v: ("frozenset", v)),
    st.sets(st.integers(), max_size=3).map(lambda v: ("set", v)),
    st.sampled_from([math.nan, math.inf, -math.inf]).map(lambda v: ("float", v)),
    st.binary(max_size=5).map(lambda v: ("bytes", v)),
    st.just(("object", object())),
    st.complex_numbers(allow_nan=False, allow_infinity=False).map(lambda v: ("complex", v)),
)
BAD_KEYS = st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(), st.tuples(st.integers()))

# A path into the session: a dict key (str) or a list index (int) per step.
paths = st.lists(st.one_of(st.text(max_size=8), st.integers(min_value=0, max_value=3)), max_size=5)


def _plant(steps, leaf):
    """Build a JSON-able structure with ``leaf`` at ``steps``; return it and the path text."""
    text = ""
    for step in steps:
        text += f"[{json.dumps(step, ensure_ascii=False)}]" if isinstance(step, str) else f"[{step}]"
    value = leaf
    for step in reversed(steps):
        if isinstance(step, str):
            value = {step: value, "ok": 1} if step != "ok" else {step: value}
        else:
            value = [None] * step + [value] + ["fine"]
    return value, text


@pytest.mark.parametrize("kind", ["memory", "json", "sqlite"])
def test_values_that_cannot_round_trip_raise_with_their_path(kind, store_dirs):
    url = _url(kind, store_dirs / f"bad-{kind}")
    writer = Sessions(from_url(url) if kind != "json" else JSONFileStore(url[5:], fsync=False),
                      initial=lambda: {"keep": "me"})
    reader = _reader(kind, url, writer)
    examples = []

    @STORE_IO
    @given(steps=paths, bad=st.one_of(BAD_LEAVES, BAD_KEYS.map(lambda k: ("key", k))), field=st.text(max_size=8))
    def refused(steps, bad, field):
        what, leaf = bad
        if what == "key":  # a dict with a non-str key, planted at the path
            leaf = {"fine": 1, leaf: "value"} if leaf != "fine" else {leaf: "value"}
        assume(field != "keep")
        value, text = _plant(steps, leaf)
        key = uuid.uuid4().hex
        with writer.open(key) as s:
            s["keep"] = "stored"
        with pytest.raises(SerializationError) as caught:
            with writer.open(key) as s:
                s["keep"] = "changed"
                s[field] = value
        err = caught.value
        expected = f"session[{json.dumps(field, ensure_ascii=False)}]{text}"
        assert err.path == expected, (what, err.path, expected)
        assert err.key == "session:" + key and repr("session:" + key) in str(err) and expected in str(err)
        with reader.open(key) as s:  # the stored session is as it was
            assert s.__wrapped__ == {"keep": "stored"}
        examples.append(1)

    refused()
    print(f"refused by {kind}: {len(examples)} examples")
    assert len(examples) >= 150


@pytest.mark.parametrize("kind", ["memory", "json", "sqlite"])
def test_a_ten_megabyte_session(kind, tmp_path):
    url = _url(kind, tmp_path)
    writer = Sessions(from_url(url))
    reader = _reader(kind, url, writer)
    big = "ü€𝄞x" * (10 * 1024 * 1024 // 10)  # 10 MB of UTF-8, multi-byte characters included
    with writer.open("big") as s:
        s["text"] = big
        s["list"] = list(range(100_000))
    with reader.open("big") as s:
        assert s["text"] == big and s["list"] == list(range(100_000))
        s["text"] += "!"
    with Sessions(writer.store if kind == "memory" else from_url(url)).open("big") as s:
        assert len(s["text"]) == len(big) + 1 and s["text"].endswith("x!")
