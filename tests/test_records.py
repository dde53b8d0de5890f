"""``read_record``'s shortcut for our own records agrees with the full, strict parse."""
import datetime
import decimal
import enum
import json
import uuid

import pytest

from telesession import Sessions
from telesession.errors import CorruptSessionError, SerializationError
from telesession.records import build_record, encode_json, parse_record, read_record
from telesession.stores import MemoryStore


class Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize("key", ["5", "-100123", 'quo"te,"data":x', "ключ", "a\\b"])
@pytest.mark.parametrize("data_json", ['{"count":1}', '[1,2,{"data":3}]', '"x,\\"data\\":1"', "null", "0"])
def test_own_records_take_the_shortcut_and_agree_with_parse_record(key, data_json):
    raw = build_record(key, data_json, 3, 1764064000.123456)
    data, version, written, text = read_record(raw, key, "here")
    assert text == data_json  # the data's own JSON: the baseline for change detection
    assert (data, version, written) == parse_record(raw, key, "here")


@pytest.mark.parametrize("raw", [
    b'{"version": 1, "written": 5.0, "key": "k", "data": {"a": 1}}',  # spaces: another writer
    b'{"data":{"a":1},"version":1,"written":5.0,"key":"k"}',  # another field order
    b'{"version":1,"written":5.0,"key":"other","data":{"a":1}}',  # a record copied from another key
    b'{"version":1,"written":5.0,"key":"k","data":{"a":1},"extra":2}',  # a field we do not know
])
def test_other_shapes_agree_with_parse_record_and_keep_their_data_bytes(raw):
    data, version, written, text = read_record(raw, "k", "here")
    assert text == '{"a":1}'  # the data's compact JSON
    assert (data, version, written) == parse_record(raw, "k", "here")


@pytest.mark.parametrize("raw, data", [
    (b'{"version":1,"written":5.0,"key":"k","data":{"a":"\xed\xa0\x80"}}', {"a": "\ud800"}),  # older writes
    (b'{"version":1,"written":5.0,"key":"k","data":{"a":1e400}}', {"a": float("inf")}),
    (b'{"version":"1","written":5,"key":"k","data":{"a":1}}', {"a": 1}),  # int() takes "1", as before
])
def test_what_msgspec_will_not_read_goes_through_the_full_parse(raw, data):
    got, version, written, text = read_record(raw, "k", "here")
    assert text is None and (got, version, written) == (data, 1, 5.0)


@pytest.mark.parametrize("raw", [
    b'{"version":1,"written":5.0,"key":"k","data":{"a":1}',  # cut short
    b'{"version":1,"written":5.0,"key":"k","data":{"a":}}',
    b'{"version":1_0,"written":5.0,"key":"k","data":{"a":1}}',  # int() would take it, JSON does not
    b'{"version":1,"written":nan,"key":"k","data":{"a":1}}',
    b'{"version":007,"written":5.0,"key":"k","data":{"a":1}}',  # JSON has no leading zeros
    b'{"version":1,"written":05.0,"key":"k","data":{"a":1}}',
    b'{"version":1,"written":5.,"key":"k","data":{"a":1}}',
    b'{"version":1,"written":.5,"key":"k","data":{"a":1}}',
    b'{"version":1,"written":5.0,"key":"k","data":{"a":1}}garbage}',
    b'\xff\xfe{"version":1}',
])
def test_damaged_records_are_refused_with_the_key_and_place(raw):
    with pytest.raises(CorruptSessionError) as info:
        read_record(raw, "k", "file k.json")
    assert info.value.key == "k" and "file k.json" in str(info.value)


@pytest.mark.parametrize("value, path, what", [
    ({"a": (1, 2)}, 'session["a"]', "tuple"),
    ({"a": {1, 2}}, 'session["a"]', "set"),
    ({"a": [frozenset()]}, 'session["a"][0]', "frozenset"),
    ({"a": b"xy"}, 'session["a"]', "bytes"),
    ({"a": bytearray(b"xy")}, 'session["a"]', "bytearray"),
    ({"a": {"b": float("nan")}}, 'session["a"]["b"]', "nan"),
    ({"a": float("-inf")}, 'session["a"]', "inf"),
    ({"a": {5: "x"}}, 'session["a"]', "key 5"),
    ({"a": datetime.date(2026, 1, 2)}, 'session["a"]', "date"),
    ({"a": uuid.UUID(int=5)}, 'session["a"]', "UUID"),
    ({"a": decimal.Decimal("1.5")}, 'session["a"]', "Decimal"),
    ({"a": Color.RED}, 'session["a"]', "Color"),
    ({"a": object()}, 'session["a"]', "object"),
])
def test_what_msgspec_would_write_but_json_cannot_hold_is_refused_with_its_path(value, path, what):
    # msgspec itself writes most of these (as arrays, strings, null): the read-back check refuses them
    with pytest.raises(SerializationError) as info:
        encode_json(value, "k", "here")
    assert info.value.path == path and what in str(info.value) and "'k'" in str(info.value)


def test_a_value_that_encodes_like_the_stored_one_is_still_refused():
    # [1, 2] and (1, 2) have the same JSON text: the check runs whether or not the text changed
    sessions = Sessions(MemoryStore())
    with sessions.open("k") as s:
        s["a"] = [1, 2]
    with pytest.raises(SerializationError, match="tuple"):
        with sessions.open("k") as s:
            s["a"] = (1, 2)
    with sessions.open("k") as s:
        assert s["a"] == [1, 2]


@pytest.mark.parametrize("value", [{"n": 2 ** 70}, {"n": -(2 ** 64)}, {"x": 1e16, "y": 5e-324, "z": -0.0},
                                   {"s": "é\u2028\x00\x7f\"\\/"}, {"": [None, True, {}]}])
def test_json_values_round_trip_and_keep_their_types(value):
    text = encode_json(value, "k", "here")
    assert json.loads(text) == value and parse_record(build_record("k", text, 0, 1.0), "k", "")[0] == value


def test_records_are_the_bytes_json_would_write():
    # the record layout other readers rely on; msgspec spells strings like json(ensure_ascii=False)
    data = {"count": 7, "name": "Zoë \"q\" \\ \n", "list": [1, 2.5, None, True]}
    text = encode_json(data, "k", "here")
    assert text == json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    assert build_record('k"1', text, 2, 1764064000.5) == (
        b'{"version":2,"written":1764064000.500000,"key":"k\\"1","data":' + text + b"}")


def test_records_written_by_the_json_module_are_read_and_not_rewritten_unless_changed(tmp_path):
    from telesession.stores import JSONFileStore

    store = JSONFileStore(str(tmp_path / "s"), fsync=False)
    old = b'{"version": 0, "written": 1764064000.5, "key": "7", "data": {"big": 1e+16, "n": 1, "s": "\\u00e9"}}'
    store.save("session:7", old)
    sessions = Sessions(store)
    with sessions.open("7") as s:
        assert s["big"] == 1e16 and s["s"] == "\u00e9"  # read, nothing changed
    assert store.load("session:7") == old  # so the other writer's bytes stay as they were
    with sessions.open("7") as s:
        s["n"] += 1
    assert json.loads(store.load("session:7"))["data"] == {"big": 1e16, "n": 2, "s": "\u00e9"}


def test_the_decorator_keeps_the_handler_s_name_and_signature():
    import inspect

    sessions = Sessions(MemoryStore())

    def handler(message, data=None):
        """Doc."""
        return data

    decorated = sessions.with_session(handler)
    assert decorated.__name__ == "handler" and decorated.__doc__ == "Doc." and decorated.__wrapped__ is handler
    assert inspect.signature(decorated) == inspect.signature(handler)  # telebot reads it for every update


def test_a_lone_surrogate_is_stored_as_the_json_module_always_stored_it():
    # msgspec will not write one; the json module did (surrogatepass), and such records exist
    store = MemoryStore()
    sessions = Sessions(store)
    with sessions.open("k") as s:
        s["a"] = "x\ud800y"
    assert b'"x\xed\xa0\x80y"' in store.load("session:k")
    with sessions.open("k") as s:
        assert s["a"] == "x\ud800y"
        s["b"] = 1
    with sessions.open("k") as s:
        assert s == {"a": "x\ud800y", "b": 1}
