"""``FakeBotAPI``: a local Telegram Bot API that a real, unmodified TeleBot polls over HTTP.

It answers the methods telebot uses for polling and replying, records what the bot
did, lets a test push user updates, and (``run_bot`` + ``wait_until_idle``) waits
until the bot has handled everything it was sent.
"""
import contextlib
import copy
import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import telebot
from telebot import apihelper, types

from .idle import IdleTracker
from .server import (_COMMAND_RE, _HOUSEKEEPING, _NOT_MODIFIED, _TOO_OLD, _TRUE_METHODS, BotAPIError, Call,
                     UploadedFile, _callback_datas, _decode_params, _describe, _Failure, _is_inline, _Params,
                     _Server, _update_kind)
from .updates import (_MAX_CAPTION, _MAX_TEXT, DEFAULT_TOKEN, _bot_user_dict, _file_ids, _member, _now, _poll,
                      _update_ids, callback_query_dict, chat_dict, message_dict, next_update_id, update_dict,
                      user_dict)

__all__ = ["FakeBotAPI"]

logger = logging.getLogger("telesession.testing")


class FakeBotAPI:
    """A local Telegram Bot API server for tests: a real TeleBot polls it over HTTP.

    ``with FakeBotAPI() as api:`` starts it on a free 127.0.0.1 port and points
    ``telebot.apihelper.API_URL`` at it (restored on exit).  Push user updates with
    :meth:`send_message`, :meth:`press_button`, :meth:`push` or :meth:`push_update`; read what the
    bot did with :attr:`sent`, :meth:`replies`, :meth:`wait_for_replies` and :attr:`calls`.

    ``strict=True`` answers edits, deletions, forwards and callback answers that refer to
    messages or queries the server never saw with Telegram's "not found" errors; the default
    fabricates them, so handlers fed by factories through ``bot.process_new_updates`` work too.
    Updates of every kind are delivered unless the bot passes ``allowed_updates``.
    telebot uses requests, which honours ``HTTP(S)_PROXY``: keep 127.0.0.1 in ``NO_PROXY``.
    """

    def __init__(self, token: str = DEFAULT_TOKEN, *, bot_username: str = "test_bot",
                 bot_first_name: str = "Test Bot", host: str = "127.0.0.1", port: int = 0,
                 max_poll_timeout: float = 30.0, strict: bool = False, patch_telebot: bool = True) -> None:
        self.token = token
        prefix = token.split(":", 1)[0]
        bot_id = int(prefix) if prefix.isdigit() else 123456
        self.bot_user: Dict[str, Any] = {
            "id": bot_id, "is_bot": True, "first_name": bot_first_name, "username": bot_username,
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False,
            "can_connect_to_business": False, "has_main_web_app": False,
        }
        self.max_poll_timeout = max_poll_timeout
        self.strict = strict
        self._host = host
        self._port = port
        self._patch = patch_telebot
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: List[Dict[str, Any]] = []
        self._confirmed_below = 0
        self._calls: List[Call] = []
        self._sent: List[Call] = []
        self._chats: Dict[Union[int, str], Dict[str, Any]] = {}
        self._messages: Dict[Tuple[Union[int, str], int], Dict[str, Any]] = {}
        self._last_message_id: Dict[Union[int, str], int] = {}
        self._callback_queries: Dict[str, Optional[Dict[str, Any]]] = {}
        self._commands: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
        self._files: Dict[str, UploadedFile] = {}
        self._custom: Dict[str, Tuple[str, Callable[[Dict[str, Any]], Any]]] = {}
        self._failures: List[_Failure] = []
        self._allowed_updates: Optional[List[str]] = None
        self._poll_generation = 0
        self._webhook: Optional[Dict[str, Any]] = None
        self._active_requests = 0
        self._unhandled: Set[int] = set()  # pushed update ids no tracked bot has dispatched yet
        self._trackers: List[IdleTracker] = []
        self._started = False
        self._stopping = False
        self._server: Optional[_Server] = None
        self._threads: List[threading.Thread] = []
        self._previous_api_url: Optional[str] = None
        self._methods: Dict[str, str] = {}
        for name in dir(self):
            if name.startswith("_m_"):
                self._methods[name[3:].lower()] = name[3:]
        for name in _TRUE_METHODS:
            self._methods.setdefault(name.lower(), name)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "FakeBotAPI":
        """Bind, start serving in daemon threads and (by default) point telebot at this server."""
        with self._lock:
            if self._started or self._server is not None:
                raise RuntimeError("FakeBotAPI.start() called twice")
            self._server = _Server(self, (self._host, self._port))
            self._started = True
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name="FakeBotAPI-{}".format(self.port), daemon=True)
        hook = threading.Thread(target=self._webhook_loop, name="FakeBotAPI-webhook-{}".format(self.port),
                                daemon=True)
        self._threads = [serve, hook]
        serve.start()
        hook.start()
        if self._patch:
            self._previous_api_url = apihelper.API_URL
            apihelper.API_URL = self.api_url  # type: ignore[assignment]  # telebot annotates it None
        logger.debug("FakeBotAPI listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Answer pending long polls, stop serving, close connections and restore telebot's API_URL."""
        with self._lock:
            if not self._started or self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
            deadline = time.monotonic() + 2.0
            while self._active_requests:  # let woken long polls send their answer
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        server = self._server
        assert server is not None
        server.shutdown()
        server.close_connections()
        server.server_close()
        for thread in self._threads:
            thread.join(5.0)
        if self._patch and apihelper.API_URL == self.api_url:
            apihelper.API_URL = self._previous_api_url  # type: ignore[assignment]  # (as above)
        logger.debug("FakeBotAPI on port %s stopped", self.port)

    def __enter__(self) -> "FakeBotAPI":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._stopping else "new"
        return "<FakeBotAPI {} {}>".format(self.url if self._server else "-", state)

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._started and not self._stopping

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after start())."""
        if self._server is None:
            raise RuntimeError("FakeBotAPI is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT``."""
        return "http://{}:{}".format(self._host, self.port)

    @property
    def api_url(self) -> str:
        """The template for ``telebot.apihelper.API_URL``: ``http://127.0.0.1:PORT/bot{0}/{1}``."""
        return self.url + "/bot{0}/{1}"

    # ----------------------------------------------------------------- pushing updates

    def push_update(self, update: Union[Mapping[str, Any], str]) -> Dict[str, Any]:
        """Queue any update (a dict or its JSON) for getUpdates; assigns ``update_id`` when missing.

        The update is checked with ``types.Update.de_json`` first, so a malformed one fails
        here, in the test, rather than in the bot's polling thread.  Returns a copy as queued.
        """
        data = json.loads(update) if isinstance(update, str) else copy.deepcopy(dict(update))
        if not any(key != "update_id" for key in data):
            raise ValueError("an update needs a payload besides update_id, e.g. {'message': {...}}")
        with self._lock:
            if self._stopping:
                raise RuntimeError("FakeBotAPI is stopped")
            if data.get("update_id") is None:
                data["update_id"] = next_update_id()
            else:
                _update_ids.bump(int(data["update_id"]))
            try:
                types.Update.de_json(copy.deepcopy(data))
            except Exception as error:
                raise ValueError("telebot cannot parse this update: {!r}: {}".format(error, data)) from error
            uid = data["update_id"]
            if uid < self._confirmed_below:
                logger.warning("FakeBotAPI: update_id %s is below the confirmed offset %s; getUpdates will "
                               "drop it", uid, self._confirmed_below)
            index = len(self._queue)
            while index and self._queue[index - 1]["update_id"] > uid:
                index -= 1
            self._queue.insert(index, data)
            if uid >= self._confirmed_below:
                self._unhandled.add(uid)
            self._observe(data)
            self._cond.notify_all()
            return copy.deepcopy(data)

    def push(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Queue an update of ``kind`` built by :func:`update_dict` (e.g. ``push("poll_answer", ...)``)."""
        return self.push_update(update_dict(kind, **fields))

    def send_message(self, chat_id: int, text: str, user_id: Optional[int] = None, *,
                     chat_type: Optional[str] = None, message_thread_id: Optional[int] = None,
                     reply_to_message_id: Optional[int] = None, message_id: Optional[int] = None,
                     **fields: Any) -> Dict[str, Any]:
        """A user writes ``text`` in ``chat_id`` (private if > 0, group if < 0); returns the update.

        Message ids count per chat, shared with the bot's messages, as in Telegram.
        """
        with self._lock:
            mid = message_id if message_id is not None else self._next_message_id(chat_id)
            reply = None
            if reply_to_message_id is not None:
                found = self._messages.get((chat_id, reply_to_message_id))
                reply = _without_reply(found) if found else {
                    "message_id": reply_to_message_id, "date": _now(), "chat": chat_dict(chat_id, chat_type)}
        message = message_dict(text, chat_id, user_id, chat_type=chat_type, message_thread_id=message_thread_id,
                               message_id=mid, reply_to_message=reply, **fields)
        return self.push_update({"message": message})

    def press_button(self, chat_id: int, data: str, user_id: Optional[int] = None,
                     message_id: Optional[int] = None, **fields: Any) -> Dict[str, Any]:
        """A user presses the inline button with callback ``data`` under a bot message; returns the update.

        Without ``message_id`` it is the newest bot message in the chat that has an inline
        keyboard (else the newest bot message, else a made-up one).
        """
        with self._lock:
            message = self._find_bot_message(chat_id, message_id)
            if message is None:
                mid = message_id if message_id is not None else self._next_message_id(chat_id)
                message = message_dict("Choose:", chat_id, user_id, message_id=mid,
                                       from_user=_bot_user_dict(self.bot_user))
                self._messages[(chat_id, mid)] = message
            datas = _callback_datas(message)
            if datas and data not in datas:
                logger.warning("FakeBotAPI: message %s in chat %s has no button with callback_data %r (it has %r)",
                               message["message_id"], chat_id, data, datas)
            query = callback_query_dict(data, chat_id, user_id, message=copy.deepcopy(message),
                                        bot_user=self.bot_user, **fields)
        return self.push_update({"callback_query": query})

    # ----------------------------------------------------------------- reading what the bot did

    @property
    def calls(self) -> List[Call]:
        """Every request received, in order of arrival (getUpdates included)."""
        with self._lock:
            return list(self._calls)

    @property
    def sent(self) -> List[Call]:
        """The bot's successful actions in order: sends, edits, answers, deletions (no getUpdates/getMe/get*)."""
        with self._lock:
            return list(self._sent)

    def sent_messages(self, chat_id: Optional[Union[int, str]] = None) -> List[Call]:
        """The calls that created a message (sendMessage, sendPhoto, forwardMessage ...), optionally for one chat."""
        with self._lock:
            return self._sent_messages(chat_id)

    def replies(self, chat_id: Optional[Union[int, str]] = None) -> List[str]:
        """Texts (or captions) of the messages the bot sent, optionally to one chat; others are skipped."""
        return [c.text for c in self.sent_messages(chat_id) if c.text is not None]

    def get_message(self, chat_id: Union[int, str], message_id: int) -> Optional[Dict[str, Any]]:
        """The server's current copy of a message (after edits), or None if unknown or deleted."""
        with self._lock:
            found = self._messages.get((chat_id, message_id))
            return copy.deepcopy(found) if found is not None else None

    @property
    def pending_updates(self) -> List[Dict[str, Any]]:
        """Updates pushed but not yet confirmed by getUpdates (or delivered to the webhook)."""
        with self._lock:
            return copy.deepcopy(self._queue)

    def callback_answer(self, query_id: str) -> Optional[Dict[str, Any]]:
        """The params of the answerCallbackQuery for ``query_id``, or None if not answered."""
        with self._lock:
            answer = self._callback_queries.get(str(query_id))
            return dict(answer) if answer is not None else None

    def wait_for_replies(self, n: int, timeout: float = 10.0,
                         chat_id: Optional[Union[int, str]] = None) -> List[Call]:
        """Block until the bot has sent at least ``n`` messages (to ``chat_id``); return them all.

        Raises ``TimeoutError`` listing what did arrive, recent failed calls and pending updates.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = self._sent_messages(chat_id)
                if len(found) >= n:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    raise TimeoutError(self._timeout_report(
                        "expected {} message(s){} within {}s, got {}".format(
                            n, "" if chat_id is None else " to chat {}".format(chat_id), timeout, len(found))))
                self._cond.wait(remaining)

    def wait_for_calls(self, method: str, n: int = 1, timeout: float = 10.0,
                       chat_id: Optional[Union[int, str]] = None, *, completed: bool = True) -> List[Call]:
        """Block until ``method`` was called successfully ``n`` times (for ``chat_id``); return those calls.

        With ``completed=False`` calls count as soon as they arrive (e.g. a long poll in progress).
        """
        name = self._methods.get(method.lower(), method)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [c for c in self._calls if c.method == name and (chat_id is None or c.chat_id == chat_id)
                         and (not completed or (c.ok and c.result is not None))]
                if len(found) >= n:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    raise TimeoutError(self._timeout_report(
                        "expected {} successful {} call(s) within {}s, got {}".format(n, name, timeout, len(found))))
                self._cond.wait(remaining)

    def wait_until_consumed(self, timeout: float = 10.0) -> None:
        """Block until every pushed update was confirmed (getUpdates with a later offset, or webhook 2xx)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    polls = sum(1 for c in self._calls if c.method == "getUpdates")
                    raise TimeoutError(
                        "{} update(s) still unconfirmed after {}s: {}; getUpdates calls so far: {} "
                        "(is the bot polling, and with the right token?)".format(
                            len(self._queue), timeout, ", ".join(_describe(u) for u in self._queue[:10]), polls))
                self._cond.wait(remaining)

    def wait_until_idle(self, timeout: float = 10.0) -> None:
        """Block until every pushed update was fetched and completely handled by the bot of :meth:`run_bot`.

        "Completely" means the handler (class middlewares and next-step handlers included)
        returned or raised, so a test can send the next message at once: a step the handler
        registered with ``register_next_step_handler`` is in place by then.  Updates the bot
        excluded with ``allowed_updates`` do not count.  Raises ``RuntimeError`` when no bot
        runs under ``run_bot``, ``TimeoutError`` (with what is still pending) after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if not self._trackers:
                    raise RuntimeError("wait_until_idle() needs a bot started with FakeBotAPI.run_bot(bot)")
                busy = [t for t in self._trackers if not t.idle]
                if not self._unhandled and not busy:
                    return
                remaining = deadline - time.monotonic()
                dead = [t for t in self._trackers if not t.thread.is_alive()]  # type: ignore[attr-defined]
                if remaining <= 0 or self._stopping or dead:
                    pending = sorted(self._unhandled)
                    raise TimeoutError(self._timeout_report(
                        "the bot was not idle within {}s: {} update(s) not dispatched yet{}, {} handler task(s) "
                        "still running{}".format(
                            timeout, len(pending), " (ids {})".format(", ".join(map(str, pending[:10])))
                            if pending else "", sum(t.tasks for t in self._trackers),
                            "; the bot's polling thread has stopped" if dead else "")))
                self._cond.wait(min(remaining, 0.5))  # also notice the polling thread dying

    def clear(self) -> None:
        """Forget the recorded calls and sent messages (chats, messages and pending updates stay)."""
        with self._lock:
            self._calls.clear()
            self._sent.clear()

    # ----------------------------------------------------------------- customising answers

    def add_method(self, name: str, handler: Callable[[Dict[str, Any]], Any]) -> None:
        """Answer ``name`` with ``handler(params)`` (its return value is the result; raise BotAPIError to fail).

        It overrides a built-in method of that name and runs outside the server's lock.
        """
        self._custom[name.lower()] = (name, handler)
        self._methods.setdefault(name.lower(), name)

    def fail(self, method: str, error_code: int = 500, description: Optional[str] = None, *, times: int = 1,
             chat_id: Optional[Union[int, str]] = None, retry_after: Optional[int] = None) -> None:
        """Make the next ``times`` calls of ``method`` (for ``chat_id``) fail with ``error_code``.

        ``fail("sendMessage", 429, retry_after=3)`` answers like Telegram's flood control;
        ``fail("sendMessage", 403, chat_id=5)`` like a user who blocked the bot.
        """
        defaults = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden: bot was blocked by the user",
                    404: "Not Found", 409: "Conflict", 429: "Too Many Requests: retry after {}".format(retry_after or 5),
                    500: "Internal Server Error", 502: "Bad Gateway"}
        parameters = {"retry_after": retry_after or 5} if error_code == 429 or retry_after else None
        error = BotAPIError(error_code, description or defaults.get(error_code, "Error"), parameters)
        name = self._methods.get(method.lower(), method)
        with self._lock:
            self._failures.append(_Failure(name, error, times, chat_id))

    # ----------------------------------------------------------------- running a bot

    @contextlib.contextmanager
    def run_bot(self, bot: "telebot.TeleBot", *, long_polling_timeout: int = 1, join_timeout: float = 10.0,
                start_timeout: float = 10.0, **polling_kwargs: Any) -> Iterator[threading.Thread]:
        """Run ``bot.infinity_polling`` in a daemon thread for the ``with`` block, then stop and join it.

        It returns once the bot's polling loop made its first getUpdates: telebot's
        ``stop_polling()`` is lost if it comes before polling started.  While it runs, the
        bot's dispatch is tracked (``telesession.testing.idle``) for :meth:`wait_until_idle`.
        """
        with self._lock:
            polls_before = sum(1 for c in self._calls if c.method == "getUpdates" and self._is_real_poll(c))
            tracker = IdleTracker(bot, self._cond, self._unhandled.difference_update)
            self._trackers.append(tracker)
        polling_kwargs.setdefault("timeout", long_polling_timeout + 10)
        thread = threading.Thread(target=bot.infinity_polling, name="FakeBotAPI-bot-polling", daemon=True,
                                  kwargs=dict(polling_kwargs, long_polling_timeout=long_polling_timeout))
        tracker.thread = thread  # type: ignore[attr-defined]
        try:
            thread.start()
            deadline = time.monotonic() + start_timeout
            with self._lock:
                while sum(1 for c in self._calls if c.method == "getUpdates" and self._is_real_poll(c)) \
                        <= polls_before:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not thread.is_alive():
                        raise RuntimeError(self._timeout_report("the bot did not start polling within {}s".format(
                            start_timeout)))
                    self._cond.wait(min(remaining, 0.1))  # also notice the thread dying
            yield thread
        finally:
            bot.stop_polling()
            if thread.ident is not None:
                thread.join(join_timeout)
            if thread.is_alive():
                logger.warning("FakeBotAPI: the bot's polling thread did not stop within %ss", join_timeout)
            with self._lock:
                self._trackers.remove(tracker)
                tracker.close()

    @staticmethod
    def _is_real_poll(call: Call) -> bool:
        offset = call.params.get("offset")
        return not (isinstance(offset, (int, float)) and offset < 0)

    # ----------------------------------------------------------------- internals

    def _request_started(self) -> None:
        with self._lock:
            self._active_requests += 1

    def _request_finished(self) -> None:
        with self._lock:
            self._active_requests -= 1
            self._cond.notify_all()

    def _sent_messages(self, chat_id: Optional[Union[int, str]]) -> List[Call]:
        return [c for c in self._sent if c.created_message and (chat_id is None or c.chat_id == chat_id)]

    def _timeout_report(self, headline: str) -> str:
        lines = [headline + "."]
        messages = self._sent_messages(None)
        if messages:
            lines.append("Messages the bot sent ({}):".format(len(messages)))
            lines.extend("  {} to {}: {!r}".format(c.method, c.chat_id, c.text) for c in messages[-20:])
        else:
            lines.append("The bot sent no messages.")
        failed = [c for c in self._calls if not c.ok][-5:]
        if failed:
            lines.append("Failed calls:")
            lines.extend("  {} {}: {} {}".format(c.method, c.chat_id if c.chat_id is not None else "",
                                                 c.error_code, c.description) for c in failed)
        lines.append("Unconfirmed updates: {}{}; getUpdates calls: {}.".format(
            len(self._queue), " ({})".format(", ".join(_describe(u) for u in self._queue[:5])) if self._queue else "",
            sum(1 for c in self._calls if c.method == "getUpdates")))
        return "\n".join(lines)

    def _next_message_id(self, chat_id: Union[int, str]) -> int:
        value = self._last_message_id.get(chat_id, 0) + 1
        self._last_message_id[chat_id] = value
        return value

    def _remember_message(self, message: Dict[str, Any]) -> None:
        chat = message.get("chat") or {}
        chat_id = chat.get("id")
        mid = message.get("message_id")
        if chat_id is None or not isinstance(mid, int):
            return
        self._chats.setdefault(chat_id, dict(chat))
        self._messages[(chat_id, mid)] = copy.deepcopy(message)
        if mid > self._last_message_id.get(chat_id, 0):
            self._last_message_id[chat_id] = mid

    def _observe(self, update: Dict[str, Any]) -> None:
        """Learn chats, messages and callback query ids from a pushed update."""
        for kind in ("message", "edited_message", "channel_post", "edited_channel_post", "business_message",
                     "edited_business_message"):
            if isinstance(update.get(kind), dict):
                self._remember_message(update[kind])
        query = update.get("callback_query")
        if isinstance(query, dict):
            self._callback_queries.setdefault(str(query.get("id")), None)
            message = query.get("message")
            if isinstance(message, dict) and message.get("date"):
                chat_id = (message.get("chat") or {}).get("id")
                if (chat_id, message.get("message_id")) not in self._messages:
                    self._remember_message(message)

    def _find_bot_message(self, chat_id: int, message_id: Optional[int]) -> Optional[Dict[str, Any]]:
        if message_id is not None:
            return self._messages.get((chat_id, message_id))
        bot_id = self.bot_user["id"]
        mine = [m for (cid, _), m in self._messages.items()
                if cid == chat_id and (m.get("from") or {}).get("id") == bot_id]
        if not mine:
            return None
        with_buttons = [m for m in mine if _is_inline(m.get("reply_markup"))]
        return max(with_buttons or mine, key=lambda m: m["message_id"])

    def _handle(self, token: str, method: str, raw: Dict[str, Any],
                files: Dict[str, UploadedFile]) -> Tuple[int, Dict[str, Any]]:
        """Answer one request: (HTTP status, JSON body)."""
        canonical = self._methods.get(method.lower())
        params = _decode_params(raw)
        text = params.get("text", params.get("caption"))
        call = Call(method=canonical or method, params=params, files=dict(files), chat_id=params.get("chat_id"),
                    text=text if isinstance(text, str) else None)
        with self._lock:
            self._calls.append(call)
            self._cond.notify_all()
        try:
            if token != self.token:
                logger.warning("FakeBotAPI: %s with unknown token %r (expected %r)", method, token, self.token)
                raise BotAPIError(401, "Unauthorized")
            custom = self._custom.get(method.lower())
            with self._lock:
                failure = self._take_failure(call)
            if failure is not None:
                raise failure
            if custom is not None:
                result = custom[1](dict(params))
            elif canonical is None:
                logger.warning("FakeBotAPI: unknown method %r (teach it with api.add_method)", method)
                raise BotAPIError(404, "Not Found: method not found")
            else:
                with self._lock:
                    handler = getattr(self, "_m_" + canonical, None)
                    result = handler(_Params(call)) if handler is not None else True
                    result = copy.deepcopy(result)
        except BotAPIError as error:
            with self._lock:
                call.error_code = error.error_code
                call.description = error.description
                self._cond.notify_all()
            logger.debug("FakeBotAPI: %s -> %s %s", call.method, error.error_code, error.description)
            return error.error_code, error.to_json()
        with self._lock:
            call.result = result
            if call.method not in _HOUSEKEEPING and not call.method.startswith("get"):
                self._sent.append(call)
            self._cond.notify_all()
        return 200, {"ok": True, "result": result}

    def _take_failure(self, call: Call) -> Optional[BotAPIError]:
        for failure in self._failures:
            if failure.method == call.method and (failure.chat_id is None or failure.chat_id == call.chat_id):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure.error
        return None

    # ---- helpers for method implementations (called with the lock held)

    def _chat(self, p: _Params, name: str = "chat_id") -> Dict[str, Any]:
        value = p.get(name)
        if value is None or value == "":
            raise BotAPIError(400, "Bad Request: {} is empty".format(name))
        if isinstance(value, str):
            wanted = value.lstrip("@").lower()
            for chat in self._chats.values():
                if str(chat.get("username", "")).lower() == wanted and value.startswith("@"):
                    return chat
            raise BotAPIError(400, "Bad Request: chat not found")
        if isinstance(value, bool) or not isinstance(value, int):
            raise BotAPIError(400, "Bad Request: chat not found")
        known = self._chats.get(value)
        if known is not None:
            return known
        chat = chat_dict(value)
        self._chats[value] = chat
        return chat

    def _new_bot_message(self, p: _Params, chat: Dict[str, Any], content: Mapping[str, Any]) -> Dict[str, Any]:
        chat_id = chat["id"]
        message: Dict[str, Any] = {"message_id": self._next_message_id(chat_id), "from": _bot_user_dict(self.bot_user),
                                   "chat": dict(chat), "date": _now()}
        if chat.get("type") == "channel":
            del message["from"]
            message["sender_chat"] = dict(chat)
        thread = p.integer("message_thread_id")
        if thread:
            message["message_thread_id"] = thread
            if chat.get("is_forum") or chat.get("type") == "private":
                message["is_topic_message"] = True
        reply_id = None
        reply = p.obj("reply_parameters", dict, "Bad Request: can't parse reply parameters JSON object")
        if reply is not None:
            reply_id = reply.get("message_id")
        elif p.get("reply_to_message_id") is not None:
            reply_id = p.integer("reply_to_message_id")
        if reply_id is not None:
            target_chat = reply.get("chat_id", chat_id) if reply else chat_id
            found = self._messages.get((target_chat, reply_id))
            if found is not None:
                message["reply_to_message"] = _without_reply(found)
            elif self.strict and not (reply or {}).get("allow_sending_without_reply"):
                raise BotAPIError(400, "Bad Request: message to be replied not found")
        for key in ("business_connection_id", "message_effect_id"):
            if p.get(key):
                message[key] = p.get(key)
        if p.flag("protect_content"):
            message["has_protected_content"] = True
        message.update({k: v for k, v in content.items() if v is not None})
        markup = p.markup()
        if _is_inline(markup):
            message["reply_markup"] = markup
        self._messages[(chat_id, message["message_id"])] = message
        p.call.message = copy.deepcopy(message)
        p.call.created_message = True
        p.call.chat_id = chat_id
        return message

    def _caption(self, p: _Params) -> Dict[str, Any]:
        caption = p.string("caption")
        if caption is not None and len(caption) > _MAX_CAPTION:
            raise BotAPIError(400, "Bad Request: message caption is too long")
        entities = p.obj("caption_entities", list)
        return {"caption": caption or None, "caption_entities": entities}

    def _file(self, p: _Params, name: str) -> Dict[str, Any]:
        upload = p.files.get(name)
        if upload is not None:
            file_id = "FAKE-{}-{}".format(name, _file_ids.next())
            self._files[file_id] = upload
            size: Optional[int] = len(upload.content)
        else:
            value = p.string(name)
            if not value:
                raise BotAPIError(400, "Bad Request: there is no {} in the request".format(name))
            if value.startswith(("http://", "https://", "attach://")):
                file_id = "FAKE-{}-{}".format(name, _file_ids.next())
                size = None
            else:
                file_id = value
                size = len(self._files[value].content) if value in self._files else None
        info: Dict[str, Any] = {"file_id": file_id,
                                "file_unique_id": hashlib.sha1(file_id.encode("utf-8")).hexdigest()[:16]}
        if size is not None:
            info["file_size"] = size
        return info

    def _edit_target(self, p: _Params, verb: str) -> Optional[Dict[str, Any]]:
        """The stored bot message an edit refers to, or None for inline messages."""
        if p.get("inline_message_id"):
            if p.get("chat_id") is not None or p.get("message_id") is not None:
                raise BotAPIError(400, "Bad Request: chat_id and message_id must be empty for inline messages")
            return None
        chat = self._chat(p)
        mid = p.required_integer("message_id", "Bad Request: message identifier is not specified")
        p.call.chat_id = chat["id"]
        message = self._messages.get((chat["id"], mid))
        if message is None:
            if self.strict:
                raise BotAPIError(400, "Bad Request: message to {} not found".format(verb))
            message = {"message_id": mid, "from": _bot_user_dict(self.bot_user), "chat": dict(chat), "date": _now(),
                       "text": ""}
            self._messages[(chat["id"], mid)] = message
        if (message.get("from") or {}).get("id") != self.bot_user["id"] and message.get("chat", {}).get("type") != \
                "channel":
            raise BotAPIError(400, "Bad Request: message can't be edited")
        return message

    def _apply_edit(self, p: _Params, message: Dict[str, Any], changes: Mapping[str, Any]) -> Dict[str, Any]:
        markup = p.markup()
        new_markup = markup if _is_inline(markup) else None
        before = {k: message.get(k) for k in changes}
        if before == dict(changes) and message.get("reply_markup") == new_markup:
            raise BotAPIError(400, _NOT_MODIFIED)
        for key, value in changes.items():
            if value is None:
                message.pop(key, None)
            else:
                message[key] = value
        if new_markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = new_markup
        message["edit_date"] = _now()
        p.call.message = copy.deepcopy(message)
        return message

    # ---- the Bot API methods (called with the lock held; the name after _m_ is the method)

    def _m_getMe(self, p: _Params) -> Any:
        return dict(self.bot_user)

    def _m_getUpdates(self, p: _Params) -> Any:
        if self._webhook is not None:
            raise BotAPIError(409, "Conflict: can't use getUpdates method while webhook is active; use "
                                   "deleteWebhook to delete the webhook first")
        offset = p.integer("offset", 0) or 0
        limit = min(max(p.integer("limit", 100) or 100, 1), 100)
        timeout = max(0.0, float(p.number("timeout", 0) or 0))
        allowed = p.obj("allowed_updates", list)
        if allowed is not None:
            self._allowed_updates = [str(a) for a in allowed] or None
        self._poll_generation += 1
        generation = self._poll_generation
        self._cond.notify_all()  # terminates an older long poll with 409, like Telegram
        self._confirm(offset)
        deadline = time.monotonic() + min(timeout, self.max_poll_timeout)
        while True:
            batch = self._deliverable(limit)
            if batch or self._stopping:
                return batch
            if generation != self._poll_generation:
                raise BotAPIError(409, "Conflict: terminated by other getUpdates request; make sure that only one "
                                       "bot instance is running")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._cond.wait(remaining)

    def _confirm(self, offset: int) -> None:
        before = len(self._queue)
        if offset > 0:
            self._confirmed_below = max(self._confirmed_below, offset)
            self._queue = [u for u in self._queue if u["update_id"] >= offset]
        elif offset < 0:
            self._queue = self._queue[offset:]
            if self._queue:
                self._confirmed_below = max(self._confirmed_below, self._queue[0]["update_id"])
        if len(self._queue) != before:
            self._cond.notify_all()

    def _deliverable(self, limit: int) -> List[Dict[str, Any]]:
        if self._allowed_updates:
            kept = [u for u in self._queue if _update_kind(u) in self._allowed_updates]
            if len(kept) != len(self._queue):
                self._unhandled.difference_update(u["update_id"] for u in self._queue
                                                  if _update_kind(u) not in self._allowed_updates)
                self._queue = kept
                self._cond.notify_all()
        return self._queue[:limit]

    def _m_sendMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        text = p.string("text")
        if not text or not text.strip():
            raise BotAPIError(400, "Bad Request: message text is empty")
        if len(text) > _MAX_TEXT:
            raise BotAPIError(400, "Bad Request: message is too long")
        preview = p.obj("link_preview_options")
        return self._new_bot_message(p, chat, {"text": text, "entities": p.obj("entities", list),
                                               "link_preview_options": preview})

    def _send_media(self, p: _Params, name: str) -> Any:
        chat = self._chat(p)
        info = self._file(p, name)
        width = p.integer("width", 320) or 320
        height = p.integer("height", 240) or 240
        duration = p.integer("duration", 1) or 1
        upload = p.files.get(name)
        if name == "photo":
            obj: Any = [dict(info, width=90, height=90), dict(info, width=width, height=height)]
            obj[0]["file_id"] = info["file_id"] + "-thumb"
        elif name in ("document", "audio", "voice"):
            obj = dict(info)
            if upload is not None:
                obj.update(file_name=upload.filename, mime_type=upload.content_type)
            if name != "document":
                obj["duration"] = duration
        elif name in ("video", "animation"):
            obj = dict(info, width=width, height=height, duration=duration)
        elif name == "video_note":
            obj = dict(info, length=p.integer("length", 240) or 240, duration=duration)
        else:  # sticker
            obj = dict(info, type="regular", width=512, height=512, is_animated=False, is_video=False)
            if p.string("emoji"):
                obj["emoji"] = p.string("emoji")
        content: Dict[str, Any] = {name: obj}
        if name == "animation":
            content["document"] = dict(info)
        if name != "sticker":
            content.update(self._caption(p))
        return self._new_bot_message(p, chat, content)

    def _m_sendPhoto(self, p: _Params) -> Any:
        return self._send_media(p, "photo")

    def _m_sendDocument(self, p: _Params) -> Any:
        return self._send_media(p, "document")

    def _m_sendAudio(self, p: _Params) -> Any:
        return self._send_media(p, "audio")

    def _m_sendVideo(self, p: _Params) -> Any:
        return self._send_media(p, "video")

    def _m_sendVoice(self, p: _Params) -> Any:
        return self._send_media(p, "voice")

    def _m_sendAnimation(self, p: _Params) -> Any:
        return self._send_media(p, "animation")

    def _m_sendSticker(self, p: _Params) -> Any:
        return self._send_media(p, "sticker")

    def _m_sendVideoNote(self, p: _Params) -> Any:
        return self._send_media(p, "video_note")

    def _location(self, p: _Params) -> Dict[str, Any]:
        latitude = p.number("latitude")
        longitude = p.number("longitude")
        if latitude is None or longitude is None:
            raise BotAPIError(400, "Bad Request: wrong latitude or longitude")
        return {"latitude": latitude, "longitude": longitude}

    def _m_sendLocation(self, p: _Params) -> Any:
        chat = self._chat(p)
        return self._new_bot_message(p, chat, {"location": self._location(p)})

    def _m_sendVenue(self, p: _Params) -> Any:
        chat = self._chat(p)
        title, address = p.string("title"), p.string("address")
        if not title or not address:
            raise BotAPIError(400, "Bad Request: venue title and address must be non-empty")
        location = self._location(p)
        return self._new_bot_message(p, chat, {"venue": {"location": location, "title": title, "address": address},
                                               "location": location})

    def _m_sendContact(self, p: _Params) -> Any:
        chat = self._chat(p)
        phone, name = p.string("phone_number"), p.string("first_name")
        if not phone or not name:
            raise BotAPIError(400, "Bad Request: phone number and first name must be non-empty")
        contact = {"phone_number": phone, "first_name": name}
        if p.string("last_name"):
            contact["last_name"] = p.string("last_name")  # type: ignore[assignment]
        return self._new_bot_message(p, chat, {"contact": contact})

    def _m_sendDice(self, p: _Params) -> Any:
        chat = self._chat(p)
        emoji = p.string("emoji") or "\U0001F3B2"
        sides = {"\U0001F3C0": 5, "\u26BD": 5, "\U0001F3B0": 64}.get(emoji, 6)
        value = (self._last_message_id.get(chat["id"], 0) % sides) + 1
        return self._new_bot_message(p, chat, {"dice": {"emoji": emoji, "value": value}})

    def _m_sendPoll(self, p: _Params) -> Any:
        chat = self._chat(p)
        question = p.string("question")
        options = p.obj("options", list, "Bad Request: can't parse options JSON object")
        if not question:
            raise BotAPIError(400, "Bad Request: poll question must be non-empty")
        if not options or len(options) < 2:
            raise BotAPIError(400, "Bad Request: poll must have at least 2 option")
        poll = _poll(question, options, is_anonymous=p.flag("is_anonymous", True),
                     type=p.string("type") or "regular", allows_multiple_answers=p.flag("allows_multiple_answers"),
                     is_closed=p.flag("is_closed"))
        return self._new_bot_message(p, chat, {"poll": poll})

    def _source_message(self, p: _Params, verb: str) -> Dict[str, Any]:
        source_chat = self._chat(p, "from_chat_id")
        mid = p.required_integer("message_id", "Bad Request: message identifier is not specified")
        found = self._messages.get((source_chat["id"], mid))
        if found is None:
            if self.strict:
                raise BotAPIError(400, "Bad Request: message to {} not found".format(verb))
            found = {"message_id": mid, "date": _now(), "chat": dict(source_chat), "text": "(unknown message)"}
        return found

    _CONTENT_KEYS = ("text", "entities", "caption", "caption_entities", "photo", "document", "audio", "video",
                     "voice", "animation", "sticker", "video_note", "location", "venue", "contact", "dice", "poll")

    def _m_forwardMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        source = self._source_message(p, "forward")
        content = {k: copy.deepcopy(source[k]) for k in self._CONTENT_KEYS if k in source}
        sender = source.get("from")
        if sender:
            content["forward_origin"] = {"type": "user", "sender_user": dict(sender), "date": source["date"]}
        else:
            content["forward_origin"] = {"type": "chat", "sender_chat": dict(source["chat"]), "date": source["date"]}
        return self._new_bot_message(p, chat, content)

    def _m_copyMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        source = self._source_message(p, "copy")
        content = {k: copy.deepcopy(source[k]) for k in self._CONTENT_KEYS if k in source}
        if p.get("caption") is not None:
            content.update(self._caption(p))
        message = self._new_bot_message(p, chat, content)
        p.call.text = message.get("text", message.get("caption"))
        return {"message_id": message["message_id"]}

    def _m_editMessageText(self, p: _Params) -> Any:
        text = p.string("text")
        if not text or not text.strip():
            raise BotAPIError(400, "Bad Request: message text is empty")
        if len(text) > _MAX_TEXT:
            raise BotAPIError(400, "Bad Request: message is too long")
        message = self._edit_target(p, "edit")
        if message is None:
            p.markup()
            return True
        if "text" not in message:
            raise BotAPIError(400, "Bad Request: there is no text in the message to edit")
        return self._apply_edit(p, message, {"text": text, "entities": p.obj("entities", list)})

    def _m_editMessageCaption(self, p: _Params) -> Any:
        caption = self._caption(p)
        message = self._edit_target(p, "edit")
        if message is None:
            p.markup()
            return True
        return self._apply_edit(p, message, caption)

    def _m_editMessageReplyMarkup(self, p: _Params) -> Any:
        message = self._edit_target(p, "edit")
        if message is None:
            p.markup()
            return True
        return self._apply_edit(p, message, {})

    def _m_deleteMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        mid = p.required_integer("message_id", "Bad Request: message identifier is not specified")
        p.call.chat_id = chat["id"]
        if self._messages.pop((chat["id"], mid), None) is None and self.strict:
            raise BotAPIError(400, "Bad Request: message to delete not found")
        return True

    def _m_deleteMessages(self, p: _Params) -> Any:
        chat = self._chat(p)
        ids = p.obj("message_ids", list, "Bad Request: can't parse message_ids JSON array") or []
        for mid in ids:
            self._messages.pop((chat["id"], mid), None)
        return True

    def _m_answerCallbackQuery(self, p: _Params) -> Any:
        query_id = p.string("callback_query_id")
        if not query_id:
            raise BotAPIError(400, _TOO_OLD)
        if query_id in self._callback_queries:
            if self._callback_queries[query_id] is not None and self.strict:
                raise BotAPIError(400, _TOO_OLD)
        elif self.strict:
            logger.warning("FakeBotAPI: answerCallbackQuery for unknown query %r (push it with press_button, "
                           "or use strict=False)", query_id)
            raise BotAPIError(400, _TOO_OLD)
        text = p.string("text")
        if text is not None and len(text) > 200:
            raise BotAPIError(400, "Bad Request: MESSAGE_TOO_LONG")
        self._callback_queries[query_id] = dict(p.values)
        return True

    def _m_sendChatAction(self, p: _Params) -> Any:
        self._chat(p)
        if not p.string("action"):
            raise BotAPIError(400, "Bad Request: wrong parameter action in request")
        return True

    @staticmethod
    def _commands_key(p: _Params) -> Tuple[str, str]:
        scope = p.obj("scope") or {"type": "default"}
        return json.dumps(scope, sort_keys=True), p.string("language_code") or ""

    def _m_setMyCommands(self, p: _Params) -> Any:
        commands = p.obj("commands", list, "Bad Request: can't parse commands JSON object")
        if commands is None:
            raise BotAPIError(400, "Bad Request: parameter \"commands\" is required")
        if len(commands) > 100:
            raise BotAPIError(400, "Bad Request: too many commands specified")
        for command in commands:
            if not isinstance(command, dict) or not _COMMAND_RE.match(str(command.get("command", ""))) \
                    or not 1 <= len(str(command.get("description", ""))) <= 256:
                raise BotAPIError(400, "Bad Request: BOT_COMMAND_INVALID")
        self._commands[self._commands_key(p)] = [dict(c) for c in commands]
        return True

    def _m_getMyCommands(self, p: _Params) -> Any:
        return list(self._commands.get(self._commands_key(p), []))

    def _m_deleteMyCommands(self, p: _Params) -> Any:
        self._commands.pop(self._commands_key(p), None)
        return True

    def _m_getChat(self, p: _Params) -> Any:
        chat = dict(self._chat(p))
        chat.setdefault("accent_color_id", 0)
        chat.setdefault("max_reaction_count", 11)
        return chat

    def _m_getChatMember(self, p: _Params) -> Any:
        chat = self._chat(p)
        user_id = p.required_integer("user_id", "Bad Request: user_id is empty")
        if user_id == self.bot_user["id"]:
            user = _bot_user_dict(self.bot_user)
            status = "member" if chat["type"] == "private" else "administrator"
        else:
            user = user_dict(user_id)
            status = "member"
        return _member(user, status)

    def _m_getChatMemberCount(self, p: _Params) -> Any:
        self._chat(p)
        return 2

    def _m_getChatAdministrators(self, p: _Params) -> Any:
        self._chat(p)
        return []

    def _m_getUserProfilePhotos(self, p: _Params) -> Any:
        return {"total_count": 0, "photos": []}

    def _m_getMyName(self, p: _Params) -> Any:
        return {"name": self.bot_user["first_name"]}

    def _m_getMyDescription(self, p: _Params) -> Any:
        return {"description": ""}

    def _m_getMyShortDescription(self, p: _Params) -> Any:
        return {"short_description": ""}

    def _m_getChatMenuButton(self, p: _Params) -> Any:
        return {"type": "default"}

    def _m_getFile(self, p: _Params) -> Any:
        file_id = p.string("file_id")
        if not file_id:
            raise BotAPIError(400, "Bad Request: file_id is empty")
        info: Dict[str, Any] = {"file_id": file_id,
                                "file_unique_id": hashlib.sha1(file_id.encode("utf-8")).hexdigest()[:16],
                                "file_path": "files/{}".format(file_id)}
        if file_id in self._files:
            info["file_size"] = len(self._files[file_id].content)
        return info

    def _m_setWebhook(self, p: _Params) -> Any:
        url = p.string("url") or ""
        if p.flag("drop_pending_updates"):
            self._queue = []
        allowed = p.obj("allowed_updates", list)
        if allowed is not None:
            self._allowed_updates = [str(a) for a in allowed] or None
        if not url:
            self._webhook = None
        else:
            if not url.startswith(("http://", "https://")):
                raise BotAPIError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
            self._webhook = {"url": url, "secret_token": p.string("secret_token"),
                             "max_connections": p.integer("max_connections", 40)}
        self._cond.notify_all()
        return True

    def _m_deleteWebhook(self, p: _Params) -> Any:
        if p.flag("drop_pending_updates"):
            self._queue = []
        self._webhook = None
        self._cond.notify_all()
        return True

    def _m_getWebhookInfo(self, p: _Params) -> Any:
        info: Dict[str, Any] = {"url": "", "has_custom_certificate": False, "pending_update_count": len(self._queue)}
        if self._webhook is not None:
            info["url"] = self._webhook["url"]
            info["max_connections"] = self._webhook["max_connections"]
            for key in ("last_error_date", "last_error_message"):
                if self._webhook.get(key):
                    info[key] = self._webhook[key]
        if self._allowed_updates:
            info["allowed_updates"] = list(self._allowed_updates)
        return info

    def _m_close(self, p: _Params) -> Any:
        return True

    def _m_logOut(self, p: _Params) -> Any:
        return True

    # ---- webhook delivery

    def _webhook_loop(self) -> None:
        """POST pending updates, oldest first, to the webhook URL while one is set (like Telegram)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        backoff = 0.1
        while True:
            with self._lock:
                while not self._stopping and (self._webhook is None or not self._deliverable(1)):
                    self._cond.wait()
                if self._stopping:
                    return
                hook = dict(self._webhook)  # type: ignore[arg-type]
                update = self._queue[0]
            error = self._post_update(opener, hook, update)
            with self._lock:
                if error is None:
                    self._queue = [u for u in self._queue if u is not update]
                    self._confirmed_below = max(self._confirmed_below, update["update_id"] + 1)
                    backoff = 0.1
                    self._cond.notify_all()
                    continue
                if self._webhook is not None:
                    self._webhook["last_error_date"] = _now()
                    self._webhook["last_error_message"] = error
                logger.debug("FakeBotAPI: webhook delivery failed: %s", error)
                if not self._stopping:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    @staticmethod
    def _post_update(opener: urllib.request.OpenerDirector, hook: Mapping[str, Any],
                     update: Mapping[str, Any]) -> Optional[str]:
        headers = {"Content-Type": "application/json"}
        if hook.get("secret_token"):
            headers["X-Telegram-Bot-Api-Secret-Token"] = str(hook["secret_token"])
        request = urllib.request.Request(str(hook["url"]), data=json.dumps(update).encode("utf-8"),
                                         headers=headers, method="POST")
        try:
            with opener.open(request, timeout=10) as response:
                response.read()
                return None
        except urllib.error.HTTPError as error:
            return "Wrong response from the webhook: {} {}".format(error.code, error.reason)
        except (OSError, ValueError) as error:
            return "Connection failed: {}".format(error)


def _without_reply(message: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``message`` fit to be a ``reply_to_message`` (Telegram nests only one level)."""
    copied = copy.deepcopy(dict(message))
    copied.pop("reply_to_message", None)
    return copied

