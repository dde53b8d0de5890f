"""telesession.testing: a real TeleBot polling FakeBotAPI over real HTTP, and the update factories."""
import http.server
import importlib.metadata
import io
import json
import threading
import time
from typing import Any, Dict, List

import pytest
import requests
import telebot
from telebot import apihelper, types

from telesession.testing import (UPDATE_KINDS, BotAPIError, FakeBotAPI, callback_update, make_callback_query,
                                 make_inline_query, make_message, make_update, message_dict, message_update,
                                 next_update_id, update_dict)


def _plugin_entry_point_installed() -> bool:
    found = importlib.metadata.entry_points()
    group = found.select(group="pytest11") if hasattr(found, "select") else found.get("pytest11", ())  # (3.9: a dict)
    return any(ep.name == "telesession" and ep.value == "telesession.pytest_plugin" for ep in group)


# The plugin comes through the pytest11 entry point once the package is pip-installed;
# only a bare checkout needs it loaded by hand (loading it twice would be an error).
pytest_plugins = [] if _plugin_entry_point_installed() else ["telesession.pytest_plugin"]


@pytest.fixture
def api():
    with FakeBotAPI() as server:
        yield server


def _start_polling(bot: telebot.TeleBot) -> threading.Thread:
    thread = threading.Thread(target=bot.infinity_polling, kwargs={"timeout": 5, "long_polling_timeout": 1},
                              daemon=True)
    thread.start()
    return thread


def _stop_polling(bot: telebot.TeleBot, thread: threading.Thread) -> None:
    bot.stop_polling()
    thread.join(15)
    assert not thread.is_alive(), "the bot's polling thread did not stop"


# --------------------------------------------------------------------------- a real bot, polling


def test_real_telebot_polls_and_answers_several_chats(api: FakeBotAPI) -> None:
    bot = telebot.TeleBot(api.token, threaded=True, num_threads=4)

    @bot.message_handler(commands=["start"])
    def start(message: types.Message) -> None:
        bot.reply_to(message, "welcome {}".format(message.chat.id))

    @bot.message_handler(func=lambda m: True)
    def echo(message: types.Message) -> None:
        bot.send_message(message.chat.id, "{}:{}".format(message.from_user.id, message.text.upper()))

    thread = _start_polling(bot)
    try:
        # wait until polling runs: a stop_polling() before that is lost (api.run_bot does this wait)
        api.wait_for_calls("getUpdates", completed=False)
        chats = {11: 11, 22: 22, -33: 7}  # chat -> user
        for chat, user in chats.items():
            api.send_message(chat, "/start", user_id=user)
        api.wait_for_replies(3)  # handlers run in parallel: keep each chat's order by waiting
        for chat, user in chats.items():
            api.send_message(chat, "hi from {}".format(chat), user_id=user)
        api.wait_for_replies(6)
        api.wait_until_consumed(timeout=10)
    finally:
        _stop_polling(bot, thread)

    for chat, user in chats.items():
        assert api.replies(chat) == ["welcome {}".format(chat), "{}:HI FROM {}".format(user, chat)]
    assert sorted(api.replies()) == sorted(r for chat in chats for r in api.replies(chat))
    first = api.sent_messages(-33)[0]
    assert first.method == "sendMessage" and first.chat_id == -33
    assert first.message["chat"]["type"] == "group"
    assert first.message["from"]["id"] == api.bot_user["id"] and first.message["from"]["is_bot"] is True
    assert first.message["reply_to_message"]["text"] == "/start"
    # message ids count per chat across user and bot messages: /start=1, reply=2, hi=3, echo=4
    assert [c.message_id for c in api.sent_messages(11)] == [2, 4]
    methods = [c.method for c in api.calls]
    assert "getMe" in methods
    polls = [c for c in api.calls if c.method == "getUpdates"]
    assert all(c.params.get("timeout") == 1 for c in polls)
    assert max(c.params.get("offset", 0) for c in polls) > 0
    assert not api.pending_updates


def test_press_button_reaches_callback_handler(api: FakeBotAPI) -> None:
    bot = telebot.TeleBot(api.token, threaded=True, num_threads=4)

    @bot.message_handler(commands=["menu"])
    def menu(message: types.Message) -> None:
        keyboard = types.InlineKeyboardMarkup()
        keyboard.add(types.InlineKeyboardButton("Yes", callback_data="yes"),
                     types.InlineKeyboardButton("No", callback_data="no"))
        bot.send_message(message.chat.id, "Sure?", reply_markup=keyboard)

    @bot.callback_query_handler(func=lambda call: True)
    def pressed(call: types.CallbackQuery) -> None:
        bot.answer_callback_query(call.id, "you said " + call.data)
        bot.edit_message_text("answer: " + call.data, call.message.chat.id, call.message.message_id)

    with api.run_bot(bot):
        api.send_message(5, "/menu")
        [menu_message] = api.wait_for_replies(1, chat_id=5)
        assert menu_message.message["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "yes"
        update = api.press_button(5, "no")
        [answer] = api.wait_for_calls("answerCallbackQuery")
        [edit] = api.wait_for_calls("editMessageText")

    query = update["callback_query"]
    assert query["message"]["message_id"] == menu_message.message_id
    assert answer.params["callback_query_id"] == query["id"]
    assert answer.text == "you said no"
    assert api.callback_answer(query["id"])["text"] == "you said no"
    assert edit.message["text"] == "answer: no" and "reply_markup" not in edit.message
    assert api.get_message(5, menu_message.message_id)["text"] == "answer: no"
    assert [c.method for c in api.sent] == ["sendMessage", "answerCallbackQuery", "editMessageText"]
    assert api.replies(5) == ["Sure?"]  # edits are not new messages


def test_factory_updates_through_process_new_updates_reply_via_server(api: FakeBotAPI) -> None:
    bot = telebot.TeleBot(api.token, threaded=False)

    @bot.message_handler(commands=["ping"])
    def ping(message: types.Message) -> None:
        bot.reply_to(message, "pong")

    @bot.callback_query_handler(func=lambda call: True)
    def pressed(call: types.CallbackQuery) -> None:
        bot.answer_callback_query(call.id)
        bot.edit_message_text("done", call.message.chat.id, call.message.message_id)

    bot.process_new_updates([message_update("/ping", chat_id=8), callback_update("x", chat_id=8)])
    assert api.replies(8) == ["pong"]
    assert [c.method for c in api.sent] == ["sendMessage", "answerCallbackQuery", "editMessageText"]


# --------------------------------------------------------------------------- errors


def test_unknown_method_is_404_promptly(api: FakeBotAPI) -> None:
    started = time.monotonic()
    with pytest.raises(apihelper.ApiTelegramException) as caught:
        apihelper._make_request(api.token, "noSuchMethod")
    assert time.monotonic() - started < 5
    assert caught.value.error_code == 404
    assert caught.value.description == "Not Found: method not found"
    assert api.calls[-1].method == "noSuchMethod" and api.calls[-1].error_code == 404


def test_wrong_token_and_bad_parameters(api: FakeBotAPI) -> None:
    with pytest.raises(apihelper.ApiTelegramException) as caught:
        telebot.TeleBot("999:WRONG").get_me()
    assert caught.value.error_code == 401

    bot = telebot.TeleBot(api.token)
    with pytest.raises(apihelper.ApiTelegramException) as caught:
        apihelper._make_request(api.token, "sendMessage", params={"chat_id": 5}, method="post")
    assert caught.value.error_code == 400 and "message text is empty" in caught.value.description
    with pytest.raises(apihelper.ApiTelegramException) as caught:
        bot.send_message("@nobody", "hi")
    assert caught.value.error_code == 400 and "chat not found" in caught.value.description
    with pytest.raises(apihelper.ApiTelegramException) as caught:
        bot.send_message(5, "x" * 5000)
    assert "message is too long" in caught.value.description

    sent = bot.send_message(5, "same")
    with pytest.raises(apihelper.ApiTelegramException) as caught:
        bot.edit_message_text("same", 5, sent.message_id)
    assert "message is not modified" in caught.value.description
    assert [c.error_code for c in api.calls if not c.ok] == [401, 400, 400, 400, 400]
    assert api.replies() == ["same"]  # failed calls are not in sent


def test_strict_mode_and_edit_rules() -> None:
    with FakeBotAPI(strict=True) as api:
        bot = telebot.TeleBot(api.token)
        for call in (lambda: bot.edit_message_text("x", 5, 999), lambda: bot.delete_message(5, 999),
                     lambda: bot.answer_callback_query("nope")):
            with pytest.raises(apihelper.ApiTelegramException) as caught:
                call()
            assert caught.value.error_code == 400
        user_update = api.send_message(5, "mine")
        with pytest.raises(apihelper.ApiTelegramException) as caught:
            bot.edit_message_text("edited", 5, user_update["message"]["message_id"])
        assert "can't be edited" in caught.value.description
        assert bot.delete_message(5, user_update["message"]["message_id"]) is True


def test_injected_failures(api: FakeBotAPI) -> None:
    bot = telebot.TeleBot(api.token)
    api.fail("sendMessage", 429, retry_after=3)
    api.fail("sendMessage", 403, chat_id=7, times=2)
    with pytest.raises(apihelper.ApiTelegramException) as caught:
        bot.send_message(1, "a")
    assert caught.value.error_code == 429 and caught.value.result_json["parameters"] == {"retry_after": 3}
    assert bot.send_message(1, "b").text == "b"
    for _ in range(2):
        with pytest.raises(apihelper.ApiTelegramException) as caught:
            bot.send_message(7, "c")
        assert caught.value.description == "Forbidden: bot was blocked by the user"
    assert bot.send_message(7, "d").text == "d"

    def custom(params: Dict[str, Any]) -> Any:
        if params.get("x") == "bad":
            raise BotAPIError(400, "Bad Request: x is bad")
        return {"echo": params.get("x")}

    api.add_method("myMethod", custom)
    assert apihelper._make_request(api.token, "myMethod", params={"x": "1"}) == {"echo": "1"}
    with pytest.raises(apihelper.ApiTelegramException):
        apihelper._make_request(api.token, "myMethod", params={"x": "bad"})


# --------------------------------------------------------------------------- getUpdates


def test_long_poll_waits_for_timeout_without_updates(api: FakeBotAPI) -> None:
    started = time.monotonic()
    result = apihelper.get_updates(api.token, offset=1, long_polling_timeout=2)
    elapsed = time.monotonic() - started
    assert result == []
    assert 1.5 <= elapsed < 8


def test_long_poll_returns_early_when_an_update_arrives(api: FakeBotAPI) -> None:
    pusher = threading.Timer(0.3, api.send_message, args=(3, "wake up"))
    pusher.start()
    started = time.monotonic()
    result = apihelper.get_updates(api.token, long_polling_timeout=20)
    elapsed = time.monotonic() - started
    pusher.join()
    assert [u["message"]["text"] for u in result] == ["wake up"]
    assert elapsed < 8


def test_offset_limit_and_confirmation(api: FakeBotAPI) -> None:
    ids = [api.send_message(4, "m{}".format(i))["update_id"] for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    first = apihelper.get_updates(api.token, limit=2, long_polling_timeout=0.1)
    assert [u["update_id"] for u in first] == ids[:2]
    again = apihelper.get_updates(api.token, long_polling_timeout=0.1)  # nothing confirmed yet
    assert [u["update_id"] for u in again] == ids
    rest = apihelper.get_updates(api.token, offset=ids[1] + 1, long_polling_timeout=0.1)
    assert [u["update_id"] for u in rest] == ids[2:]
    assert len(api.pending_updates) == 1
    with pytest.raises(TimeoutError, match="1 update"):
        api.wait_until_consumed(timeout=0.2)
    confirm = threading.Timer(0.2, apihelper.get_updates, args=(api.token,),
                              kwargs={"offset": ids[2] + 1, "long_polling_timeout": 0.1})
    confirm.start()
    api.wait_until_consumed(timeout=5)
    confirm.join()
    # a negative offset keeps only the newest updates
    more = [api.send_message(4, "n{}".format(i))["update_id"] for i in range(3)]
    assert [u["update_id"] for u in apihelper.get_updates(api.token, offset=-1)] == more[-1:]
    assert [u["update_id"] for u in api.pending_updates] == more[-1:]


def test_allowed_updates_and_second_poller_conflict(api: FakeBotAPI) -> None:
    api.push("poll_answer", poll_id="p1", user_id=3)
    api.send_message(3, "text")
    got = apihelper.get_updates(api.token, allowed_updates=["message"], long_polling_timeout=0.1)
    assert [next(k for k in u if k != "update_id") for u in got] == ["message"]

    results: List[Any] = []

    def first_poller() -> None:
        try:
            results.append(apihelper.get_updates(api.token, offset=got[-1]["update_id"] + 1,
                                                 long_polling_timeout=10))
        except apihelper.ApiTelegramException as error:
            results.append(error.error_code)

    thread = threading.Thread(target=first_poller)
    thread.start()
    api.wait_for_calls("getUpdates", n=2, completed=False)
    time.sleep(0.2)  # let the first poll start waiting
    assert apihelper.get_updates(api.token, offset=got[-1]["update_id"] + 1, long_polling_timeout=0.1) == []
    thread.join(10)
    assert results == [409]


def test_stop_answers_a_pending_long_poll_promptly() -> None:
    api = FakeBotAPI().start()
    results: List[Any] = []
    thread = threading.Thread(target=lambda: results.append(apihelper.get_updates(api.token,
                                                                                  long_polling_timeout=25)))
    thread.start()
    api.wait_for_calls("getUpdates", timeout=5, completed=False)
    time.sleep(0.2)  # let it start waiting
    started = time.monotonic()
    api.stop()
    thread.join(10)
    assert time.monotonic() - started < 5
    assert results == [[]]
    assert not api.running


def test_api_url_restored_and_nested_servers() -> None:
    before = apihelper.API_URL
    with FakeBotAPI() as outer:
        assert apihelper.API_URL == outer.api_url == "http://127.0.0.1:{}/bot{{0}}/{{1}}".format(outer.port)
        assert outer.url == "http://127.0.0.1:{}".format(outer.port)
        with FakeBotAPI("42:OTHER", bot_username="other_bot") as inner:
            assert apihelper.API_URL == inner.api_url
            assert telebot.TeleBot(inner.token).get_me().username == "other_bot"
            assert inner.bot_user["id"] == 42
        assert apihelper.API_URL == outer.api_url
        me = telebot.TeleBot(outer.token).get_me()
        assert (me.id, me.is_bot, me.username) == (123456, True, "test_bot")
    assert apihelper.API_URL == before


def test_wait_for_replies_timeout_lists_what_arrived(api: FakeBotAPI) -> None:
    telebot.TeleBot(api.token).send_message(9, "only one")
    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        api.wait_for_replies(2, timeout=0.3, chat_id=9)
    assert time.monotonic() - started < 5
    assert "expected 2 message(s) to chat 9" in str(caught.value)
    assert "'only one'" in str(caught.value)


# --------------------------------------------------------------------------- request formats


def test_multipart_json_and_form_bodies(api: FakeBotAPI) -> None:
    bot = telebot.TeleBot(api.token)
    payload = bytes(range(256)) * 3
    doc = bot.send_document(6, types.InputFile(io.BytesIO(payload), "data.bin"),
                            caption="the file")
    assert doc.document.file_size == len(payload) and doc.caption == "the file"
    assert api.sent[-1].files["document"].content == payload
    assert api.sent[-1].files["document"].filename == "data.bin"
    assert bot.get_file(doc.document.file_id).file_size == len(payload)

    url = api.api_url.format(api.token, "sendMessage")
    as_json = requests.post(url, json={"chat_id": 6, "text": "json body",
                                       "reply_markup": {"inline_keyboard": [[{"text": "a", "callback_data": "a"}]]}})
    assert as_json.json()["result"]["reply_markup"]["inline_keyboard"][0][0]["text"] == "a"
    as_form = requests.post(url, data={"chat_id": "6", "text": "form body"})
    assert as_form.json()["result"]["text"] == "form body"
    as_query = requests.get(url, params={"chat_id": "6", "text": "query"})
    assert as_query.json()["ok"] is True
    broken = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["ok"] is False
    assert api.replies(6) == ["the file", "json body", "form body", "query"]

    assert bot.send_chat_action(6, "typing") is True
    assert bot.set_my_commands([types.BotCommand("start", "Start it")]) is True
    assert [c.command for c in bot.get_my_commands()] == ["start"]
    assert bot.get_chat(6).id == 6
    assert bot.delete_message(6, doc.message_id) is True
    assert api.get_message(6, doc.message_id) is None
    assert bot.delete_webhook() is True and bot.get_webhook_info().url == ""
    assert bot.log_out() is True and bot.close() is True


def test_webhook_delivery(api: FakeBotAPI) -> None:
    received: List[Dict[str, Any]] = []
    secrets: List[str] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            secrets.append(self.headers.get("X-Telegram-Bot-Api-Secret-Token", ""))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        bot = telebot.TeleBot(api.token)
        assert bot.set_webhook("http://127.0.0.1:{}/hook".format(hook.server_address[1]), secret_token="s3cret")
        with pytest.raises(apihelper.ApiTelegramException) as caught:
            bot.get_updates(long_polling_timeout=1)
        assert caught.value.error_code == 409
        api.send_message(2, "via webhook")
        api.wait_until_consumed(timeout=10)
        assert [u["message"]["text"] for u in received] == ["via webhook"]
        assert secrets == ["s3cret"]
        assert bot.get_webhook_info().pending_update_count == 0
        assert bot.delete_webhook() is True
    finally:
        hook.shutdown()
        hook.server_close()


# --------------------------------------------------------------------------- factories


def test_message_factories() -> None:
    private = make_message("hello", chat_id=5)
    assert isinstance(private, types.Message)
    assert (private.chat.id, private.chat.type, private.from_user.id, private.text) == (5, "private", 5, "hello")
    group = make_message("/start@test_bot now", chat_id=-20, user_id=7)
    assert (group.chat.type, group.from_user.id, group.content_type) == ("group", 7, "text")
    assert group.entities[0].type == "bot_command" and group.entities[0].length == len("/start@test_bot")
    assert telebot.util.extract_command(group.text) == "start"
    topic = make_message("in topic", chat_id=-1001234567890, user_id=3, message_thread_id=12)
    assert (topic.chat.type, topic.chat.is_forum, topic.message_thread_id, topic.is_topic_message) == \
        ("supergroup", True, 12, True)
    assert make_message(chat_id=-5, chat_type="supergroup").chat.type == "supergroup"
    channel = make_update("channel_post", text="news").channel_post
    assert channel.chat.type == "channel" and channel.sender_chat.id == channel.chat.id

    query = make_callback_query("go", chat_id=-40, user_id=9)
    assert isinstance(query, types.CallbackQuery)
    assert (query.data, query.from_user.id, query.message.chat.id, query.message.from_user.is_bot) == \
        ("go", 9, -40, True)
    inline = make_inline_query("cats", user_id=4)
    assert isinstance(inline, types.InlineQuery) and (inline.query, inline.from_user.id) == ("cats", 4)

    first, second = message_update("a", 1), message_update("b", 1, update_id=None)
    assert isinstance(first, types.Update) and second.update_id > first.update_id
    assert next_update_id() > second.update_id
    assert message_update("x", 2, update_id=10 ** 9).update_id == 10 ** 9
    assert next_update_id() > 10 ** 9  # the shared counter never goes back
    raw = make_update(message=message_dict("raw", chat_id=3))
    assert raw.message.text == "raw"
    assert callback_update("d", chat_id=4, user_id=6).callback_query.from_user.id == 6


EXPECTED_KIND_TYPES = {
    "message": types.Message, "edited_message": types.Message, "channel_post": types.Message,
    "edited_channel_post": types.Message, "business_message": types.Message,
    "edited_business_message": types.Message, "callback_query": types.CallbackQuery,
    "inline_query": types.InlineQuery, "chosen_inline_result": types.ChosenInlineResult,
    "shipping_query": types.ShippingQuery, "pre_checkout_query": types.PreCheckoutQuery, "poll": types.Poll,
    "poll_answer": types.PollAnswer, "my_chat_member": types.ChatMemberUpdated,
    "chat_member": types.ChatMemberUpdated, "chat_join_request": types.ChatJoinRequest,
    "message_reaction": types.MessageReactionUpdated, "message_reaction_count": types.MessageReactionCountUpdated,
    "chat_boost": types.ChatBoostUpdated, "removed_chat_boost": types.ChatBoostRemoved,
    "business_connection": types.BusinessConnection, "deleted_business_messages": types.BusinessMessagesDeleted,
    "purchased_paid_media": types.PaidMediaPurchased,
}


@pytest.mark.parametrize("kind", UPDATE_KINDS)
def test_every_update_kind_parses_with_defaults(kind: str) -> None:
    update = make_update(kind)
    assert isinstance(update, types.Update)
    assert isinstance(getattr(update, kind), EXPECTED_KIND_TYPES[kind])


def test_update_kinds_carry_the_given_ids() -> None:
    def user_of(obj: Any) -> int:
        return (getattr(obj, "from_user", None) or obj.user).id

    assert user_of(make_update("chosen_inline_result", user_id=5, result_id="r").chosen_inline_result) == 5
    assert user_of(make_update("shipping_query", user_id=6).shipping_query) == 6
    checkout = make_update("pre_checkout_query", user_id=7, total_amount=250).pre_checkout_query
    assert (checkout.from_user.id, checkout.total_amount) == (7, 250)
    answer = make_update("poll_answer", poll_id="p", user_id=8, option_ids=[1]).poll_answer
    assert (answer.poll_id, answer.user.id, answer.option_ids) == ("p", 8, [1])
    mine = make_update("my_chat_member", chat_id=-50, user_id=9, new_status="administrator").my_chat_member
    assert (mine.chat.id, mine.from_user.id, mine.new_chat_member.user.id) == (-50, 9, 123456)
    assert mine.new_chat_member.status == "administrator" and mine.old_chat_member.status == "left"
    member = make_update("chat_member", chat_id=-51, user_id=10, new_status="kicked").chat_member
    assert (member.chat.id, member.new_chat_member.user.id, member.new_chat_member.status) == (-51, 10, "kicked")
    join = make_update("chat_join_request", chat_id=-52, user_id=11).chat_join_request
    assert (join.chat.id, join.from_user.id, join.user_chat_id) == (-52, 11, 11)
    reaction = make_update("message_reaction", chat_id=-53, user_id=12, message_id=4,
                           new_reaction=["\U0001F525"]).message_reaction
    assert (reaction.chat.id, reaction.user.id, reaction.message_id) == (-53, 12, 4)
    assert reaction.new_reaction[0].emoji == "\U0001F525"
    business = make_update("business_message", text="b", chat_id=13).business_message
    assert (business.chat.id, business.from_user.id, business.business_connection_id) == (13, 13, "bc1")
    assert make_update("edited_message", text="e", chat_id=14).edited_message.edit_date
    assert make_update("purchased_paid_media", user_id=15).purchased_paid_media.from_user.id == 15
    with pytest.raises(ValueError, match="unknown update kind"):
        update_dict("no_such_kind")


def test_pushed_update_kinds_reach_telebot_handlers(api: FakeBotAPI) -> None:
    bot = telebot.TeleBot(api.token, threaded=True, num_threads=2)
    seen: List[str] = []
    done = threading.Event()

    @bot.poll_answer_handler(func=lambda a: True)
    def on_answer(answer: types.PollAnswer) -> None:
        seen.append("poll_answer:{}".format(answer.user.id))

    @bot.chat_join_request_handler(func=lambda r: True)
    def on_join(request: types.ChatJoinRequest) -> None:
        seen.append("join:{}".format(request.from_user.id))
        done.set()

    with api.run_bot(bot):
        api.push("poll_answer", user_id=21)
        api.push("chat_join_request", chat_id=-60, user_id=22)
        assert done.wait(10)
    assert sorted(seen) == ["join:22", "poll_answer:21"]
    with pytest.raises(ValueError):
        api.push_update({"update_id": next_update_id()})


# --------------------------------------------------------------------------- pytest plugin


def test_plugin_entry_point_is_installed() -> None:
    assert _plugin_entry_point_installed(), "pip install -e . registers the pytest11 entry point"


def test_fake_bot_api_fixture(fake_bot_api: FakeBotAPI) -> None:
    assert fake_bot_api.running
    assert apihelper.API_URL == fake_bot_api.api_url
    assert telebot.TeleBot(fake_bot_api.token).get_me().id == fake_bot_api.bot_user["id"]


# --------------------------------------------------------------------------- wait_until_idle


def _next_step_bot(api: FakeBotAPI, rounds_log: List[str]) -> telebot.TeleBot:
    """A conversation whose step is registered well after the question was sent."""
    bot = telebot.TeleBot(api.token, threaded=True, num_threads=4)

    @bot.message_handler(commands=["start"])
    def start(message: types.Message) -> None:
        bot.send_message(message.chat.id, "your name?")
        time.sleep(0.05)  # the reply is out long before the step exists: a racing test loses
        bot.register_next_step_handler(message, got_name)

    def got_name(message: types.Message) -> None:
        rounds_log.append(message.text)
        bot.send_message(message.chat.id, "hello {}".format(message.text))

    @bot.message_handler(func=lambda m: True)
    def other(message: types.Message) -> None:
        bot.send_message(message.chat.id, "say /start first")

    return bot


def test_wait_until_idle_makes_a_next_step_conversation_deterministic(api: FakeBotAPI) -> None:
    names: List[str] = []
    bot = _next_step_bot(api, names)
    with api.run_bot(bot):
        for i in range(5):
            api.send_message(7, "/start")
            api.wait_until_idle()  # no sleep: the step is registered when this returns
            api.send_message(7, "Bob{}".format(i))
            api.wait_until_idle()
    assert names == ["Bob{}".format(i) for i in range(5)]
    assert api.replies(7) == [r for i in range(5) for r in ("your name?", "hello Bob{}".format(i))]


def test_wait_for_replies_alone_races_the_next_step(api: FakeBotAPI) -> None:
    # The reason for wait_until_idle: the reply arrives before the handler finished.
    names: List[str] = []
    bot = _next_step_bot(api, names)
    with api.run_bot(bot):
        api.send_message(8, "/start")
        api.wait_for_replies(1, chat_id=8)
        api.send_message(8, "Ann")
        api.wait_until_idle()
    assert names == [] and api.replies(8) == ["your name?", "say /start first"]


def test_wait_until_idle_waits_for_a_running_handler_and_reports_it(api: FakeBotAPI) -> None:
    release = threading.Event()
    bot = telebot.TeleBot(api.token, threaded=True, num_threads=2)

    @bot.message_handler(func=lambda m: True)
    def slow(message: types.Message) -> None:
        release.wait(30)
        bot.send_message(message.chat.id, "done")

    with api.run_bot(bot):
        api.send_message(3, "x")
        with pytest.raises(TimeoutError, match=r"1 handler task\(s\) still running"):
            api.wait_until_idle(timeout=1.0)
        release.set()
        api.wait_until_idle()
        assert api.replies(3) == ["done"]


def test_wait_until_idle_counts_a_handler_that_raised(api: FakeBotAPI) -> None:
    bot = telebot.TeleBot(api.token, threaded=True, num_threads=2)
    seen: List[str] = []

    @bot.message_handler(func=lambda m: True)
    def boom(message: types.Message) -> None:
        seen.append(message.text)
        raise ValueError("handler failed")

    with api.run_bot(bot):
        api.send_message(4, "a")
        api.send_message(4, "b")
        api.wait_until_idle()
        assert sorted(seen) == ["a", "b"]


def test_wait_until_idle_needs_run_bot_and_restores_the_bot(api: FakeBotAPI) -> None:
    with pytest.raises(RuntimeError, match="run_bot"):
        api.wait_until_idle(timeout=0.1)
    bot = telebot.TeleBot(api.token, threaded=False)
    with api.run_bot(bot):
        assert "_exec_task" in bot.__dict__ and "process_new_updates" in bot.__dict__
        api.send_message(5, "hi")
        api.wait_until_idle()
    assert "_exec_task" not in bot.__dict__ and "process_new_updates" not in bot.__dict__


def _install_key_chains(bot: telebot.TeleBot, marks: List[Any]) -> None:
    """A stand-in for a per-key scheduler wrapping ``bot._exec_task``: one chain per chat, a task
    appended to a running chain is run by that chain's task, never submitted on its own."""
    inner = bot._exec_task
    mutex = threading.Lock()
    chains: Dict[int, List[Any]] = {}

    def drain(chat_id: int) -> None:
        while True:
            with mutex:
                if not chains[chat_id]:
                    del chains[chat_id]
                    return
                task, args, kwargs = chains[chat_id].pop(0)
            time.sleep(0.02)
            task(*args, **kwargs)

    def exec_task(task: Any, *args: Any, **kwargs: Any) -> None:
        marks.append(getattr(task, "_chain_marker", None))
        chat_id = args[0].chat.id
        with mutex:
            running = chat_id in chains
            chains.setdefault(chat_id, []).append((task, args, kwargs))
        if not running:
            inner(drain, chat_id)

    bot._exec_task = exec_task  # type: ignore[method-assign]


@pytest.mark.parametrize("order", ["scheduler-first", "tracker-first"])
def test_wait_until_idle_composes_with_another_exec_task_wrapper(api: FakeBotAPI, order: str) -> None:
    bot = telebot.TeleBot(api.token, threaded=True, num_threads=4)
    handled: List[str] = []
    marks: List[Any] = []

    @bot.message_handler(func=lambda m: True)
    def record(message: types.Message) -> None:
        handled.append(message.text)

    run = bot._run_middlewares_and_handler  # what telebot queues per update, marked like setup() marks it

    def marked(*args: Any, **kwargs: Any) -> Any:
        return run(*args, **kwargs)

    marked._chain_marker = "kept"  # type: ignore[attr-defined]
    bot._run_middlewares_and_handler = marked  # type: ignore[method-assign]
    if order == "scheduler-first":
        _install_key_chains(bot, marks)
    with api.run_bot(bot):
        if order == "tracker-first":
            _install_key_chains(bot, marks)
        for i in range(6):
            api.send_message(9, str(i))
        api.wait_until_idle()
        assert sorted(handled, key=int) == [str(i) for i in range(6)]
    assert marks and set(marks) == {"kept"}  # the wrapper saw the task's attributes either way


@pytest.mark.parametrize("order", ["setup-first", "run_bot-first"])
def test_wait_until_idle_with_sessions_setup(api: FakeBotAPI, order: str) -> None:
    from telesession import Sessions, session

    bot = telebot.TeleBot(api.token, threaded=True, num_threads=4, use_class_middlewares=True)
    sessions = Sessions("memory://", initial=lambda: {"step": "", "name": ""})

    @bot.message_handler(commands=["start"])
    def start(message: types.Message) -> None:
        session["step"] = "name"
        bot.send_message(message.chat.id, "your name?")
        time.sleep(0.05)
        bot.register_next_step_handler(message, got_name)

    def got_name(message: types.Message) -> None:  # next-step handlers bypass the middleware
        with sessions.open(str(message.chat.id)) as s:
            s["name"], s["step"] = message.text, "done"
        bot.send_message(message.chat.id, "hello {}".format(message.text))

    if order == "setup-first":
        sessions.setup(bot)
    with api.run_bot(bot):
        if order == "run_bot-first":
            sessions.setup(bot)
        for chat in (11, 12, 13):
            api.send_message(chat, "/start")
        api.wait_until_idle()
        for chat in (11, 12, 13):
            # One at a time: telebot 4.37's _notify_next_handlers pops from the batch it iterates,
            # so in one batch of three step-taken messages the one after a taken one is skipped.
            api.send_message(chat, "N{}".format(chat))
            api.wait_until_idle()
    for chat in (11, 12, 13):
        assert api.replies(chat) == ["your name?", "hello N{}".format(chat)]
        with sessions.open(str(chat)) as s:
            assert s == {"step": "done", "name": "N{}".format(chat)}


def test_drain_returns_at_once_for_a_bot_without_threads() -> None:
    from telesession import Sessions, session
    from telesession.testing import drain, message_update

    bot = telebot.TeleBot("1:x", threaded=False, use_class_middlewares=True)
    sessions = Sessions(initial=lambda: {"n": 0})
    sessions.setup(bot)
    bot.message_handler(func=lambda m: True)(lambda m: session.__setitem__("n", session["n"] + 1))
    bot.process_new_updates([message_update(chat_id=5, update_id=i) for i in range(1, 4)])
    drain(bot, timeout=1.0)  # threaded=False: everything already ran inline; no worker pool to wait for
    with sessions.open("5") as s:
        assert s["n"] == 3
