"""``read_record``'s shortcut for our own records agrees with the full, strict parse."""
import pytest

from telesession.errors import CorruptSessionError
from telesession.records import build_record, parse_record, read_record


@pytest.mark.parametrize("key", ["5", "-100123", 'quo"te,"data":x', "ключ", "a\\b"])
@pytest.mark.parametrize("data_json", ['{"count":1}', '[1,2,{"data":3}]', '"x,\\"data\\":1"', "null", "0"])
def test_own_records_take_the_shortcut_and_agree_with_parse_record(key, data_json):
    raw = build_record(key, data_json, 3, 1764064000.123456)
    data, version, written, text = read_record(raw, key, "here")
    assert text == data_json.encode()  # the data's own JSON bytes: the baseline for change detection
    assert (data, version, written) == parse_record(raw, key, "here")


@pytest.mark.parametrize("raw", [
    b'{"version": 1, "written": 5.0, "key": "k", "data": {"a": 1}}',  # spaces: another writer
    b'{"data":{"a":1},"version":1,"written":5.0,"key":"k"}',  # another field order
    b'{"version":1,"written":5.0,"key":"other","data":{"a":1}}',  # a record copied from another key
    b'{"version":1,"written":5.0,"key":"k","data":{"a":1},"extra":2}',  # a field we do not know
])
def test_other_shapes_go_through_the_full_parse(raw):
    data, version, written, text = read_record(raw, "k", "here")
    assert text is None
    assert (data, version, written) == parse_record(raw, "k", "here")


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
