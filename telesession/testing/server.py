"""The HTTP side of ``FakeBotAPI``: the threaded server, request parsing and what a call records.

``BotAPIError`` is an error answer, ``Call`` one recorded request, ``UploadedFile`` a
multipart upload; ``_Server``/``_Handler`` turn HTTP requests into ``FakeBotAPI._handle`` calls.
"""
import email.parser
import email.policy
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Protocol, Set, Tuple, Union

from .updates import _MAX_BODY

__all__ = ["BotAPIError", "Call", "UploadedFile"]

logger = logging.getLogger("telesession.testing")


class _Backend(Protocol):
    """What the server needs of ``FakeBotAPI`` (named here, so this module does not import it)."""

    def _request_started(self) -> None: ...

    def _request_finished(self) -> None: ...

    def _handle(self, token: str, method: str, raw: Dict[str, Any],
                files: Dict[str, "UploadedFile"]) -> Tuple[int, Dict[str, Any]]: ...


class BotAPIError(Exception):
    """An error answer of the fake Bot API; raise it from a handler given to ``FakeBotAPI.add_method``."""

    def __init__(self, error_code: int, description: str, parameters: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__("{} {}".format(error_code, description))
        self.error_code = error_code
        self.description = description
        self.parameters = dict(parameters) if parameters else None

    def to_json(self) -> Dict[str, Any]:
        """The response body, as Telegram sends it."""
        body: Dict[str, Any] = {"ok": False, "error_code": self.error_code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


class UploadedFile(NamedTuple):
    """A file the bot uploaded in a multipart request."""

    filename: Optional[str]
    content: bytes
    content_type: str


@dataclass
class Call:
    """One Bot API request the server received: ``method``, decoded ``params`` and what it answered.

    ``chat_id`` and ``text`` (the text, or caption) are lifted from the params; ``message`` is the
    message the call created or edited (a snapshot); ``result`` the answer's result, or
    ``error_code``/``description`` for failed calls.  ``call["text"]`` works like ``call.text``.
    """

    method: str
    params: Dict[str, Any]
    chat_id: Optional[Union[int, str]] = None
    text: Optional[str] = None
    files: Dict[str, UploadedFile] = field(default_factory=dict)
    result: Any = None
    message: Optional[Dict[str, Any]] = None
    created_message: bool = False
    error_code: Optional[int] = None
    description: Optional[str] = None
    time: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        return self.error_code is None

    @property
    def message_id(self) -> Optional[int]:
        """The id of the message this call created or edited."""
        return self.message.get("message_id") if self.message else None

    def __getitem__(self, key: str) -> Any:
        if key.startswith("_") or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access to the fields."""
        try:
            return self[key]
        except KeyError:
            return default


# Parameter decoding: everything arrives as strings in a query string or form, or typed in JSON.
_JSON_FIELDS = frozenset((
    "reply_markup", "entities", "caption_entities", "link_preview_options", "reply_parameters",
    "allowed_updates", "commands", "scope", "media", "results", "options", "permissions", "reaction",
    "menu_button", "rights", "message_ids", "prices", "shipping_options", "explanation_entities",
    "question_entities", "button", "suggested_post_parameters", "input_message_content",
))
_NUMBER_FIELDS = frozenset((
    "message_id", "from_chat_id", "user_id", "offset", "limit", "timeout", "message_thread_id", "cache_time",
    "until_date", "duration", "width", "height", "length", "max_connections", "direct_messages_topic_id",
    "open_period", "close_date", "latitude", "longitude", "horizontal_accuracy", "live_period", "heading",
    "proximity_alert_radius", "correct_option_id", "total_amount", "sender_chat_id", "draft_id",
))
_BOOL_FIELDS = frozenset((
    "show_alert", "disable_notification", "protect_content", "drop_pending_updates", "disable_web_page_preview",
    "allow_sending_without_reply", "is_anonymous", "allows_multiple_answers", "is_closed", "revoke_messages",
    "only_if_banned", "is_big", "return_bots", "has_spoiler", "supports_streaming", "allow_paid_broadcast",
    "disable_content_type_detection", "show_caption_above_media", "ok", "for_channels",
))
_HOUSEKEEPING = frozenset(("getUpdates", "getMe", "setWebhook", "deleteWebhook", "getWebhookInfo", "close",
                           "logOut"))
_TRUE_METHODS = (
    "sendChatAction", "deleteMyCommands", "setMessageReaction", "pinChatMessage", "unpinChatMessage",
    "unpinAllChatMessages", "unpinAllForumTopicMessages", "leaveChat", "banChatMember", "unbanChatMember",
    "restrictChatMember", "promoteChatMember", "setChatAdministratorCustomTitle", "banChatSenderChat",
    "unbanChatSenderChat", "setChatPermissions", "setChatTitle", "setChatDescription", "setChatPhoto",
    "deleteChatPhoto", "approveChatJoinRequest", "declineChatJoinRequest", "setMyName", "setMyDescription",
    "setMyShortDescription", "setChatMenuButton", "setMyDefaultAdministratorRights", "answerInlineQuery",
    "answerShippingQuery", "answerPreCheckoutQuery", "answerWebAppQuery", "setChatStickerSet",
    "deleteChatStickerSet", "sendMessageDraft", "readBusinessMessage",
)
_TOO_OLD = "Bad Request: query is too old and response timeout expired or query ID is invalid"
_NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and reply markup are "
                 "exactly the same as a current content and reply markup of the message")
_COMMAND_RE = re.compile(r"^[a-z0-9_]{1,32}$")
_PATH_RE = re.compile(r"^/bot([^/]+)/([^/]+)/?$")


def _decode_value(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if name in _JSON_FIELDS:
        try:
            return json.loads(value)
        except ValueError:
            return value
    if name in _NUMBER_FIELDS or name == "chat_id":
        try:
            return int(value)
        except ValueError:
            try:
                return float(value) if name != "chat_id" else value
            except ValueError:
                return value
    if name in _BOOL_FIELDS:
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0", ""):
            return False
    return value


def _decode_params(raw: Mapping[str, Any]) -> Dict[str, Any]:
    return {name: _decode_value(name, value) for name, value in raw.items()}


def _parse_multipart(body: bytes, content_type: str) -> Tuple[Dict[str, str], Dict[str, UploadedFile]]:
    head = "Content-Type: {}\r\nMIME-Version: 1.0\r\n\r\n".format(content_type).encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("malformed multipart/form-data body")
    fields: Dict[str, str] = {}
    files: Dict[str, UploadedFile] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        raw = part.get_payload(decode=True)
        payload = raw if isinstance(raw, bytes) else b""
        filename = part.get_filename()
        if filename is None:
            charset = part.get_content_charset() or "utf-8"
            fields[str(name)] = payload.decode(charset, "replace")
        else:
            files[str(name)] = UploadedFile(filename, payload, part.get_content_type())
    return fields, files


class _Params:
    """Typed access to one request's decoded params, raising Telegram-style 400 errors."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.values = call.params
        self.files = call.files

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    def string(self, name: str, default: Optional[str] = None) -> Optional[str]:
        value = self.values.get(name)
        if value is None:
            return default
        return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else \
            str(value)

    def number(self, name: str, default: Optional[float] = None) -> Optional[float]:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BotAPIError(400, "Bad Request: invalid {} specified".format(name))
        return value

    def integer(self, name: str, default: Optional[int] = None, missing: Optional[str] = None) -> Optional[int]:
        value = self.number(name)
        if value is None:
            if missing is not None:
                raise BotAPIError(400, missing)
            return default
        if int(value) != value:
            raise BotAPIError(400, "Bad Request: invalid {} specified".format(name))
        return int(value)

    def required_integer(self, name: str, missing: str) -> int:
        value = self.integer(name)
        if value is None:
            raise BotAPIError(400, missing)
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BotAPIError(400, "Bad Request: invalid {} specified".format(name))
        return value

    def obj(self, name: str, kind: type = dict, error: Optional[str] = None) -> Any:
        value = self.values.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, kind):
            raise BotAPIError(400, error or "Bad Request: can't parse {} JSON object".format(name))
        return value

    def markup(self) -> Optional[Dict[str, Any]]:
        """The reply_markup, validated; only an inline keyboard becomes part of a message."""
        markup = self.obj("reply_markup", dict, "Bad Request: can't parse reply keyboard markup JSON object")
        if markup is None:
            return None
        if not any(k in markup for k in ("inline_keyboard", "keyboard", "remove_keyboard", "force_reply")):
            raise BotAPIError(400, "Bad Request: can't parse reply keyboard markup JSON object")
        if "inline_keyboard" in markup:
            rows = markup["inline_keyboard"]
            if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
                raise BotAPIError(400, "Bad Request: field \"inline_keyboard\" of the InlineKeyboardMarkup "
                                       "should be an Array of Arrays")
            for row in rows:
                for button in row:
                    if not isinstance(button, dict) or "text" not in button:
                        raise BotAPIError(400, "Bad Request: can't find field \"text\"")
                    data = button.get("callback_data")
                    if data is not None and not 1 <= len(str(data).encode("utf-8")) <= 64:
                        raise BotAPIError(400, "Bad Request: BUTTON_DATA_INVALID")
        return markup


def _is_inline(markup: Optional[Mapping[str, Any]]) -> bool:
    return bool(markup) and "inline_keyboard" in markup  # type: ignore[operator]


def _callback_datas(message: Mapping[str, Any]) -> List[str]:
    markup = message.get("reply_markup") or {}
    return [str(b.get("callback_data")) for row in markup.get("inline_keyboard", []) for b in row
            if isinstance(b, dict) and b.get("callback_data") is not None]


def _update_kind(update: Mapping[str, Any]) -> str:
    for key in update:
        if key != "update_id":
            return key
    return "?"


def _describe(update: Mapping[str, Any]) -> str:
    kind = _update_kind(update)
    payload = update.get(kind)
    text = ""
    if isinstance(payload, dict):
        text = payload.get("text") or payload.get("data") or payload.get("query") or ""
    return "#{} {}{}".format(update.get("update_id"), kind, " {!r}".format(text) if text else "")


class _Failure:
    def __init__(self, method: str, error: BotAPIError, times: int, chat_id: Optional[Union[int, str]]) -> None:
        self.method = method
        self.error = error
        self.times = times
        self.chat_id = chat_id


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, api: _Backend, address: Tuple[str, int]) -> None:
        self.api = api
        self._conn_lock = threading.Lock()
        self._conns: Set[socket.socket] = set()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conn_lock:
            if alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("FakeBotAPI: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeBotAPI/1.0"
    # Headers and body go out in two writes; with Nagle on, loopback delays the body ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        logger.debug("FakeBotAPI %s: %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: List[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY:
                    self.close_connection = True
                    raise BotAPIError(413, "Request Entity Too Large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            raise BotAPIError(413, "Request Entity Too Large")
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        api = self.server.api
        api._request_started()
        try:
            try:
                status, body = self._process(api)
            except BotAPIError as error:
                status, body = error.error_code, error.to_json()
            except Exception as error:  # never let a bug hang the client
                logger.exception("FakeBotAPI: internal error on %s", self.path)
                status, body = 500, {"ok": False, "error_code": 500,
                                     "description": "Internal Server Error: {}".format(error)}
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                self.close_connection = True
        finally:
            api._request_finished()

    def _process(self, api: _Backend) -> Tuple[int, Dict[str, Any]]:
        parts = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        match = _PATH_RE.match(parts.path)
        if not match:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        token = urllib.parse.unquote(match.group(1))
        method = urllib.parse.unquote(match.group(2))
        raw: Dict[str, Any] = {k: v[-1] for k, v in
                               urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()}
        files: Dict[str, UploadedFile] = {}
        header = self.headers.get("Content-Type", "")
        ctype = header.split(";", 1)[0].strip().lower()
        try:
            if body:
                if ctype == "application/json":
                    obj = json.loads(body.decode("utf-8"))
                    if not isinstance(obj, dict):
                        raise ValueError("the JSON body must be an object")
                    raw.update(obj)
                elif ctype == "multipart/form-data":
                    fields, files = _parse_multipart(body, header)
                    raw.update(fields)
                elif ctype in ("application/x-www-form-urlencoded", ""):
                    raw.update({k: v[-1] for k, v in urllib.parse.parse_qs(
                        body.decode("utf-8"), keep_blank_values=True).items()})
                else:
                    raise ValueError("unsupported Content-Type {!r}".format(ctype))
        except (ValueError, UnicodeDecodeError) as error:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: {}".format(error)}
        return api._handle(token, method, raw, files)

