"""telebot's own states API (set_state, StateFilter, retrieve_data, States V2) on ``StateStorage``."""
import json
import os
import pickle
import threading
import time

import pytest
import telebot
from telebot import custom_filters
from telebot.states import State, StatesGroup
from telebot.states.sync.context import StateContext
from telebot.states.sync.middleware import StateMiddleware
from telebot.storage import StateMemoryStorage, StatePickleStorage

from telesession import Sessions, StateStorage, session
from telesession.cli import main as cli_main
from telesession.errors import CorruptSessionError, LockTimeout, SerializationError
from telesession.records import build_record
from telesession.states import STATE_PREFIX, parse_telebot_key, state_key
from telesession.stores import from_url
from telesession.testing import callback_update, make_update, message_update

TOKEN = "123456:TEST"
BOT_ID = 123456
STATE_KINDS = ["memory", "json", "sqlite", "redis"]


@pytest.fixture(params=STATE_KINDS)
def state_url(request, tmp_path):
    if request.param == "memory":
        return "memory://"
    if request.param == "json":
        return f"json:{tmp_path / 'states'}"
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'states.sqlite'}"
    base = request.getfixturevalue("redis_url")
    return f"{base}?prefix=states-{os.urandom(4).hex()}:"


def increments(bot: telebot.TeleBot, threads: int = 8, times: int = 100, user: int = 77) -> None:
    """``threads`` threads each add 1 ``times`` times through ``with bot.retrieve_data(...)``."""
    start = threading.Barrier(threads)
    errors = []

    def work():
        start.wait()
        try:
            for _ in range(times):
                with bot.retrieve_data(user, user) as data:
                    value = data.get("n", 0)
                    time.sleep(0)  # let another thread run between the read and the write
                    data["n"] = value + 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []


def test_retrieve_data_counts_exactly_where_telebots_memory_storage_loses(state_url, capsys):
    ours = telebot.TeleBot(TOKEN, state_storage=StateStorage(state_url))
    ours.set_state(77, "counting", 77)
    increments(ours)
    with ours.retrieve_data(77, 77) as data:
        assert data["n"] == 800
    assert ours.get_state(77, 77) == "counting"

    peer = telebot.TeleBot(TOKEN, state_storage=StateMemoryStorage())
    peer.set_state(77, "counting", 77)  # telebot's storages only save data of a user with a state
    increments(peer)
    with peer.retrieve_data(77, 77) as data:
        lost = 800 - data["n"]
    assert 0 <= lost <= 800
    with capsys.disabled():
        print(f"\n[states] {state_url.split(':')[0]}: StateStorage 800/800; "
              f"telebot StateMemoryStorage lost {lost} of 800")


def test_an_exception_in_the_block_propagates_and_saves_nothing(state_url):
    bot = telebot.TeleBot(TOKEN, state_storage=StateStorage(state_url))
    bot.set_state(5, "s", 5)
    bot.add_data(5, 5, kept=1)
    with pytest.raises(KeyError, match="boom"):
        with bot.retrieve_data(5, 5) as data:
            data["kept"] = 2
            data["new"] = True
            raise KeyError("boom")
    assert bot.current_states.get_data(5, 5, bot_id=BOT_ID) == {"kept": 1}
    # the key's lock was released: another thread takes it at once
    other = StateStorage(bot.current_states.store, lock_timeout=5)
    assert other.set_state(5, 5, "t", bot_id=BOT_ID) and bot.get_state(5, 5) == "t"


def test_telebots_own_storage_swallows_the_exception_and_saves():
    """What issue 11 fixes, shown on telebot itself (if telebot changes this, the test says so)."""
    bot = telebot.TeleBot(TOKEN, state_storage=StateMemoryStorage())
    bot.set_state(5, "s", 5)
    with bot.retrieve_data(5, 5) as data:
        data["half"] = "written"
        raise KeyError("swallowed")
    assert bot.current_states.get_data(5, 5, bot_id=BOT_ID) == {"half": "written"}


def test_the_block_holds_the_keys_lock(state_url):
    storage = StateStorage(state_url)
    bot = telebot.TeleBot(TOKEN, state_storage=storage)
    impatient = StateStorage(storage.store, lock_timeout=0.2)
    outcome = []

    def other_thread():
        try:
            impatient.set_data(9, 9, "x", 1, bot_id=BOT_ID)
            outcome.append("written")
        except LockTimeout as exc:
            outcome.append(exc)

    with bot.retrieve_data(9, 9) as data:
        data["mine"] = 1
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        bot.set_state(9, "inside")  # the same thread re-enters the key
        bot.add_data(9, 9, added=2)
        assert data == {"mine": 1, "added": 2}  # the block sees what is written inside it
        data["mine"] = 3
    assert isinstance(outcome[0], LockTimeout) and state_key(9, 9, bot_id=BOT_ID) in str(outcome[0])
    assert bot.get_state(9, 9) == "inside"  # the block's save kept the state set inside it
    assert storage.get_data(9, 9, bot_id=BOT_ID) == {"mine": 3, "added": 2}
    impatient.set_data(9, 9, "x", 1, bot_id=BOT_ID)
    assert storage.get_data(9, 9, bot_id=BOT_ID) == {"mine": 3, "added": 2, "x": 1}
    with bot.retrieve_data(9, 9) as data:
        bot.reset_data(9, 9)
        assert data == {}
        data["after_reset"] = True
        with bot.retrieve_data(9, 9) as inner:  # re-entered: the same dict, saved by the outer block
            assert inner is data
            inner["inner"] = 1
    assert storage.get_data(9, 9, bot_id=BOT_ID) == {"after_reset": True, "inner": 1}
    with bot.retrieve_data(9, 9) as data:
        bot.delete_state(9, 9)
        assert data == {}
    assert bot.get_state(9, 9) is None and list(storage.keys()) == []
    with pytest.raises(ValueError):
        with bot.retrieve_data(9, 9) as data:
            bot.set_state(9, "kept")  # written at once, like outside a block
            data["lost"] = 1
            raise ValueError
    assert bot.get_state(9, 9) == "kept" and storage.get_data(9, 9, bot_id=BOT_ID) == {}


def test_states_survive_a_restart_of_the_bot(tmp_path):
    for url in (f"json:{tmp_path / 'states'}", f"sqlite:{tmp_path / 'states.db'}"):
        first = telebot.TeleBot(TOKEN, state_storage=StateStorage(url))
        first.set_state(3, "Form:age", 30)
        with first.retrieve_data(3, 30) as data:
            data["name"] = "Ada"
        first.current_states.close()
        second = telebot.TeleBot(TOKEN, state_storage=StateStorage(url))
        assert second.get_state(3, 30) == "Form:age"
        with second.retrieve_data(3, 30) as data:
            assert data == {"name": "Ada"}
        other_bot = telebot.TeleBot("999:OTHER", state_storage=StateStorage(url))
        assert other_bot.get_state(3, 30) is None  # telebot's keys hold the bot id
        second.current_states.close()


class Form(StatesGroup):
    name = State()
    age = State()


def states_v2_bot(storage):
    bot = telebot.TeleBot(TOKEN, state_storage=storage, use_class_middlewares=True, threaded=False)
    bot.add_custom_filter(custom_filters.StateFilter(bot))
    bot.setup_middleware(StateMiddleware(bot))
    done = []

    @bot.message_handler(commands=["start"])
    def start(message, state: StateContext):
        state.set(Form.name)

    @bot.message_handler(state=Form.name)
    def got_name(message, state: StateContext):
        state.add_data(name=message.text)
        state.set(Form.age)

    @bot.message_handler(state=Form.age, is_digit=True)
    def got_age(message, state: StateContext):
        with state.data() as data:
            done.append((message.chat.id, data["name"], int(message.text)))
        state.delete()

    @bot.message_handler(state=Form.age, is_digit=False)
    def bad_age(message, state: StateContext):
        with state.data() as data:
            data["tries"] = data.get("tries", 0) + 1

    @bot.callback_query_handler(func=lambda c: True, state="*")
    def any_state(call, state: StateContext):
        with state.data() as data:
            data["pressed"] = call.data

    bot.add_custom_filter(custom_filters.IsDigitFilter())
    return bot, done


def test_states_v2_bot_runs_a_multi_step_flow(state_url):
    storage = StateStorage(state_url)
    bot, done = states_v2_bot(storage)
    send = lambda text, chat: bot.process_new_updates([message_update(text, chat_id=chat, user_id=chat)])  # noqa
    send("/start", 1)
    send("/start", 2)
    send("Ada", 1)
    send("Bob", 2)
    send("forty", 1)
    send("many", 1)
    bot.process_new_updates([callback_update("yes", chat_id=1, user_id=1)])
    assert bot.get_state(1, 1) == "Form:age"
    assert storage.get_data(1, 1, bot_id=BOT_ID) == {"name": "Ada", "tries": 2, "pressed": "yes"}
    send("36", 1)
    send("41", 2)
    assert sorted(done) == [(1, "Ada", 36), (2, "Bob", 41)]
    assert bot.get_state(1, 1) is None and bot.get_state(2, 2) is None
    assert list(storage.keys()) == []  # a deleted state leaves no record behind
    send("no state", 1)  # StateFilter: no handler matches, nothing is created
    assert list(storage.keys()) == []


def test_key_semantics_follow_telebot_thread_business_and_bot():
    storage = StateStorage()
    bot, _ = states_v2_bot(storage)

    @bot.business_message_handler(commands=["start"])
    def business_start(message, state: StateContext):
        state.set(Form.name)

    topic = make_update("message", text="/start", chat_id=-100, user_id=4, message_thread_id=7)
    plain = message_update("/start", chat_id=-100, user_id=4)
    business = make_update("business_message", text="/start", chat_id=4, user_id=4)
    bot.process_new_updates([topic])
    assert bot.get_state(4, -100, message_thread_id=7) == "Form:name"
    assert bot.get_state(4, -100) is None  # a topic's state is not the chat's
    bot.process_new_updates([plain, business])
    assert bot.get_state(4, 4, business_connection_id="bc1") == "Form:name"
    assert bot.get_state(4, 4) is None  # nor is a business connection's the direct chat's
    assert sorted(storage.keys()) == sorted([
        f"{STATE_PREFIX}{BOT_ID}:-100:4:7:-", f"{STATE_PREFIX}{BOT_ID}:-100:4:-:-",
        f"{STATE_PREFIX}{BOT_ID}:4:4:-:bc1"])
    assert storage.get_state(-100, 4, message_thread_id=7, bot_id=1) is None  # another bot


def test_states_and_sessions_share_a_store_without_colliding(tmp_path):
    store = from_url(f"sqlite:{tmp_path / 'bot.db'}")
    sessions = Sessions(store)
    storage = StateStorage(store)
    bot = telebot.TeleBot(TOKEN, state_storage=storage, use_class_middlewares=True, threaded=False)
    sessions.setup(bot)

    @bot.message_handler(func=lambda m: True)
    def both(message):
        session["seen"] = session.get("seen", 0) + 1
        bot.set_state(message.from_user.id, "x", message.chat.id)
        with bot.retrieve_data(message.from_user.id, message.chat.id) as data:
            data["seen"] = data.get("seen", 0) + 10

    for _ in range(3):
        bot.process_new_updates([message_update("hi", chat_id=8, user_id=8)])
    with sessions.open("8") as s:
        assert s == {"seen": 3}
    assert storage.get_data(8, 8, bot_id=BOT_ID) == {"seen": 30}
    assert sorted(store.keys()) == [f"{BOT_ID}:session:8", f"{STATE_PREFIX}{BOT_ID}:8:8:-:-"]


def test_unreadable_records_and_unstorable_values_are_errors_naming_key_and_place(tmp_path):
    storage = StateStorage(f"json:{tmp_path / 'states'}")
    key = storage.key(1, 1, bot_id=BOT_ID)
    storage.store.save(key, b'{"version":0,"data":')
    with pytest.raises(CorruptSessionError) as info:
        storage.get_state(1, 1, bot_id=BOT_ID)
    assert info.value.key == key and str(tmp_path) in info.value.where
    with pytest.raises(CorruptSessionError):
        storage.set_state(1, 1, "x", bot_id=BOT_ID)
    with pytest.raises(CorruptSessionError):
        storage.delete_state(1, 1, bot_id=BOT_ID)
    assert storage.store.load(key) == b'{"version":0,"data":'  # left untouched
    storage.store.save(key, build_record(key, '[1,2]', 0, time.time()))  # valid JSON, not a state
    with pytest.raises(CorruptSessionError, match="not a state record"):
        storage.get_data(1, 1, bot_id=BOT_ID)

    bot = telebot.TeleBot(TOKEN, state_storage=storage)
    bot.set_state(2, "s", 2)
    with pytest.raises(SerializationError) as err:
        with bot.retrieve_data(2, 2) as data:
            data["when"] = {"at": {1, 2}}
    assert err.value.path == 'data["when"]["at"]' and err.value.key == storage.key(2, 2, bot_id=BOT_ID)
    with pytest.raises(SerializationError):
        bot.add_data(2, 2, pair=(1, 2))
    assert storage.get_data(2, 2, bot_id=BOT_ID) == {}
    storage.set_data(2, 2, "ok", 1, bot_id=BOT_ID)  # the lock was released after each error


def test_ttl_expires_states(tmp_path):
    storage = StateStorage(f"sqlite:{tmp_path / 's.db'}", ttl=60)
    storage.set_state(1, 1, "old", bot_id=1)
    key = storage.key(1, 1, bot_id=1)
    storage.store.save(key, build_record(key, '{"state":"old","data":{"a":1}}', 0, time.time() - 61),
                       previous=storage.store.load(key))
    assert storage.get_state(1, 1, bot_id=1) is None and storage.get_data(1, 1, bot_id=1) == {}
    storage.set_data(1, 1, "b", 2, bot_id=1)
    assert storage.get_data(1, 1, bot_id=1) == {"b": 2} and storage.get_state(1, 1, bot_id=1) is None


def test_parse_telebot_key():
    assert parse_telebot_key("telebot:5:6") == (None, None, None, 5, 6)
    assert parse_telebot_key("telebot:123:-100:6") == (123, None, None, -100, 6)
    assert parse_telebot_key("telebot:123:bcX:9:-100:6") == (123, "bcX", 9, -100, 6)
    assert parse_telebot_key("telebot:123:7:-100:6") == (123, None, 7, -100, 6)
    assert parse_telebot_key("telebot:123:bcX:4:4") == (123, "bcX", None, 4, 4)
    with pytest.raises(ValueError):
        parse_telebot_key("other:1:2")


def test_cli_imports_a_state_pickle_storage_file(tmp_path, capsys):
    old = StatePickleStorage(file_path=str(tmp_path / "states.pkl"))
    old_bot = telebot.TeleBot(TOKEN, state_storage=old)
    old_bot.set_state(1, "Form:age", 1)
    old_bot.add_data(1, 1, name="Ada", langs=["en", "fr"])
    old_bot.set_state(2, "Form:name", -100, message_thread_id=5)
    old_bot.set_state(3, "Form:name", 3, business_connection_id="bcQ")
    url = f"sqlite:{tmp_path / 'new.db'}"
    assert cli_main(["import-states", url, str(tmp_path / "states.pkl")]) == 0
    assert "imported 3 states" in capsys.readouterr().out
    new_bot = telebot.TeleBot(TOKEN, state_storage=StateStorage(url))
    assert new_bot.get_state(1, 1) == "Form:age"
    with new_bot.retrieve_data(1, 1) as data:
        assert data == {"name": "Ada", "langs": ["en", "fr"]}
    assert new_bot.get_state(2, -100, message_thread_id=5) == "Form:name"
    assert new_bot.get_state(3, 3, business_connection_id="bcQ") == "Form:name"
    # running it again changes nothing; a changed state is refused unless --overwrite
    assert cli_main(["import-states", url, str(tmp_path / "states.pkl")]) == 0
    assert "3 unchanged" in capsys.readouterr().out
    new_bot.set_state(1, "Form:done", 1)
    assert cli_main(["import-states", url, str(tmp_path / "states.pkl")]) == 1
    assert "already exist" in capsys.readouterr().err
    assert new_bot.get_state(1, 1) == "Form:done"
    assert cli_main(["import-states", url, str(tmp_path / "states.pkl"), "--overwrite"]) == 0
    assert new_bot.get_state(1, 1) == "Form:age"


def test_cli_import_runs_no_code_from_the_pickle(tmp_path, capsys):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"telebot:1:1": {"state": "s", "data": {"run": os.system}}}))
    assert cli_main(["import-states", f"sqlite:{tmp_path / 'n.db'}", str(evil)]) == 1
    err = capsys.readouterr().err
    assert "only plain data" in err and ".system" in err


def test_a_state_name_is_stored_as_json_in_the_session_record_format(tmp_path):
    storage = StateStorage(f"json:{tmp_path / 'st'}")
    storage.set_state(1, 2, Form.age, bot_id=5)
    raw = storage.store.load(storage.key(1, 2, bot_id=5))
    record = json.loads(raw)
    assert record["key"] == f"{STATE_PREFIX}5:1:2:-:-" and record["data"] == {"state": "Form:age", "data": {}}
    assert record["version"] == 0 and abs(record["written"] - time.time()) < 3600


def test_import_telesession_does_not_import_telebot_until_state_storage_is_used():
    import subprocess
    import sys

    code = ("import sys, telesession; assert 'telebot' not in sys.modules, 'eager'; "
            "telesession.StateStorage; assert 'telebot' in sys.modules; "
            "from telebot.storage import StateStorageBase; "
            "assert isinstance(telesession.StateStorage(), StateStorageBase)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _increments_in_child(url: str, times: int, barrier) -> None:
    bot = telebot.TeleBot(TOKEN, state_storage=StateStorage(url))
    barrier.wait()
    for _ in range(times):
        with bot.retrieve_data(66, 66) as data:
            data["n"] = data.get("n", 0) + 1
    bot.current_states.close()


@pytest.mark.parametrize("kind", ["sqlite", "json", "redis"])
def test_retrieve_data_is_exact_across_processes(kind, tmp_path, request):
    import multiprocessing

    url = {"sqlite": f"sqlite:{tmp_path / 's.db'}", "json": f"json:{tmp_path / 'j'}"}.get(kind)
    if url is None:
        url = f"{request.getfixturevalue('redis_url')}?prefix=states-{os.urandom(4).hex()}:"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    children = [ctx.Process(target=_increments_in_child, args=(url, 50, barrier)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [c.exitcode for c in children] == [0, 0, 0, 0]
    assert StateStorage(url).get_data(66, 66, bot_id=BOT_ID) == {"n": 200}


def test_nothing_is_written_when_nothing_changed(state_url):
    storage = StateStorage(state_url)
    bot = telebot.TeleBot(TOKEN, state_storage=storage)
    bot.set_state(4, "s", 4)
    bot.add_data(4, 4, items=[1, {"a": None}], name="é")
    key = storage.key(4, 4, bot_id=BOT_ID)
    before = storage.store.load(key)
    time.sleep(0.01)  # a write would carry a later "written" time
    with bot.retrieve_data(4, 4) as data:
        assert data == {"items": [1, {"a": None}], "name": "é"}
    bot.set_state(4, "s", 4)
    bot.add_data(4, 4, name="é")
    assert storage.store.load(key) == before
    assert bot.retrieve_data(4, 4).data["name"] == "é"  # telebot's StateDataContext.data, without `with`
    with bot.retrieve_data(4, 4) as data:
        data["items"].append(2)
    assert storage.get_data(4, 4, bot_id=BOT_ID)["items"] == [1, {"a": None}, 2]
