"""A webhook bot served by several worker processes that share one session store.

Telegram POSTs every update to your HTTPS URL.  Here 3 worker processes each run a
standard-library HTTP server; each request's update is handled right inside the
request (``TeleBot(threaded=False)``), so the 200 answer means "handled and saved".
The processes share one ``SQLiteStore`` (or Redis, for several machines), and the
chat's lock is held across processes: two updates of one chat arriving at two
workers at once still count exactly.

    BOT_TOKEN=123:ABC python3 examples/webhook_bot.py --webhook-url https://bot.example.com/ \\
        [--port 8080] [--workers 3] [--store sqlite:data/sessions.sqlite | --store redis://localhost:6379/0]
    python3 examples/webhook_bot.py --demo     # no token, no internet: a local fake Bot API

Worker i listens on 127.0.0.1:PORT+i; put a TLS-terminating reverse proxy in front that
spreads requests over them (nginx: ``upstream bot { server 127.0.0.1:8080; server
127.0.0.1:8081; server 127.0.0.1:8082; }`` and ``proxy_pass http://bot;``).
"""
import argparse
import hmac
import json
import multiprocessing
import os
import queue
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import telebot

from telesession import Sessions, session

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def make_bot(token: str, store_url: str):
    """The bot: ``/count`` adds one to the chat's counter and replies with it."""
    # threaded=False: process_new_updates runs the handler in the calling (request) thread.
    bot = telebot.TeleBot(token, threaded=False, use_class_middlewares=True)
    sessions = Sessions(store=store_url, initial=lambda: {"count": 0})  # a store URL: "sqlite:...", "redis://..."
    sessions.setup(bot)

    @bot.message_handler(commands=["count"])
    def count(message):
        session["count"] += 1  # the chat is locked across all worker processes meanwhile
        bot.reply_to(message, str(session["count"]))

    return bot, sessions


class WebhookHandler(BaseHTTPRequestHandler):
    """``POST /``: one update from Telegram, handled before the answer."""

    bot: telebot.TeleBot
    secret: str

    def do_POST(self):  # noqa: N802 - http.server's naming
        # Telegram sends back the secret_token given to set_webhook: reject anyone else.
        if not hmac.compare_digest(self.headers.get(SECRET_HEADER, ""), self.secret):
            self.send_error(403)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            update = telebot.types.Update.de_json(body.decode("utf-8"))
            self.bot.process_new_updates([update])
        except Exception:
            # A failed handler saved nothing, so Telegram's retry of this update starts from
            # the same session: answering 500 is safe.
            self.send_error(500)
            raise
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):  # noqa: A002 - keep the demo's output short
        pass


def serve(sock: socket.socket, token: str, store_url: str, secret: str, api_url=None) -> None:
    """A worker process: serve webhook requests on the listening socket it was given."""
    parent = os.getppid()
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    if api_url:
        telebot.apihelper.API_URL = api_url  # the demo's fake Bot API instead of api.telegram.org
    bot, _ = make_bot(token, store_url)
    handler = type("Handler", (WebhookHandler,), {"bot": bot, "secret": secret})
    server = ThreadingHTTPServer(sock.getsockname(), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock  # already bound and listening (by the parent)
    server.serve_forever()


def exit_with_parent(parent: int) -> None:
    """A worker never outlives the main process, even one killed with SIGKILL."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def start_workers(count: int, host: str, port: int, token: str, store_url: str, secret: str, api_url=None):
    """Start ``count`` worker processes on ports PORT, PORT+1, ... (0: free ports); their addresses."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited but the socket
    workers, addresses = [], []
    for i in range(count):
        # The parent binds and listens, so requests queue up until the worker is ready.
        sock = socket.create_server((host, port + i if port else 0), backlog=128)
        addresses.append(sock.getsockname())
        process = context.Process(target=serve, args=(sock, token, store_url, secret, api_url),
                                  name=f"webhook-worker-{i}", daemon=True)
        process.start()
        sock.close()  # the worker has its own copy
        workers.append(process)
    return workers, addresses


def stop_workers(workers) -> None:
    for process in workers:
        process.terminate()
    for process in workers:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


# --------------------------------------------------------------------------- the demo

def demo(store_url: str, n_workers: int = 3) -> None:
    """Post 600 updates of 40 chats to the workers from 8 client threads; check every count."""
    from telesession.testing import DEFAULT_TOKEN, FakeBotAPI, update_dict

    chats = list(range(3001, 3031)) + list(range(-4001, -4011, -1))  # 30 private chats, 10 groups
    per_chat = 15
    updates = [update_dict("message", text="/count", chat_id=chat, user_id=abs(chat) if chat > 0 else 1 + k % 4)
               for k in range(per_chat) for chat in chats]
    secret = secrets.token_urlsafe(16)
    sessions = Sessions(store=store_url, initial=lambda: {"count": 0})  # the parent reads the results
    sessions.bind(DEFAULT_TOKEN)  # the bot's sessions: stored under its id, as setup(bot) does
    # A --store that already holds these chats is fine: the demo checks increments.
    before = {chat: (sessions.get(str(chat)) or {"count": 0})["count"] for chat in chats}

    with FakeBotAPI() as api:
        workers, addresses = start_workers(n_workers, "127.0.0.1", 0, api.token, store_url, secret, api.api_url)
        try:
            print(f"webhook_bot demo: {len(updates)} updates of {len(chats)} chats, 8 client threads, "
                  f"{n_workers} worker processes (ports {', '.join(str(a[1]) for a in addresses)}), "
                  f"store {store_url}")
            started = time.monotonic()
            # Update i goes to worker i % n: each chat's updates are spread over all workers.
            jobs: "queue.Queue" = queue.Queue()
            for i, update in enumerate(updates):
                jobs.put((addresses[i % n_workers], update))
            errors: list = []
            clients = [threading.Thread(target=post_all, args=(jobs, secret, errors)) for _ in range(8)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            check(not errors, f"{len(errors)} webhook requests failed, e.g. {errors[:3]}")
            print(f"  all {len(updates)} requests answered 200 in {time.monotonic() - started:.1f} s "
                  f"(each answer comes after the update was handled and saved)")
        finally:
            stop_workers(workers)  # always: no worker outlives the demo
        print(f"  workers stopped (exit codes {[w.exitcode for w in workers]})")

        for chat in chats:
            replies = api.replies(chat)
            expected = [str(n) for n in range(before[chat] + 1, before[chat] + per_chat + 1)]
            check(replies == expected, f"chat {chat}: replies {replies}, expected {expected}")
            with sessions.open(str(chat)) as stored:
                check(stored["count"] == before[chat] + per_chat,
                      f"chat {chat}: stored {stored['count']}, expected {before[chat] + per_chat}")
        print(f"  every chat got replies {before[chats[0]] + 1}..{before[chats[0]] + per_chat} in order "
              f"and its stored count grew by exactly {per_chat}, across {n_workers} processes")
    print("OK: all counts exact")


def post_all(jobs: "queue.Queue", secret: str, errors: list) -> None:
    """A client thread: POST updates to the workers as Telegram would, until none are left."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
    while not errors:  # stop at the first failure rather than wait out every timeout
        try:
            (host, port), update = jobs.get_nowait()
        except queue.Empty:
            return
        request = urllib.request.Request(f"http://{host}:{port}/", data=json.dumps(update).encode(),
                                         headers={"Content-Type": "application/json", SECRET_HEADER: secret})
        try:
            with opener.open(request, timeout=15) as response:
                if response.status != 200:
                    errors.append(f"port {port}: HTTP {response.status}")
        except OSError as error:
            errors.append(f"port {port}: {error}")


def check(condition: bool, message: str) -> None:
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Set BOT_TOKEN and --webhook-url to run the bot, or pass --demo.")
    parser.add_argument("--demo", action="store_true", help="run against a local fake Bot API and verify")
    parser.add_argument("--store", help="store URL (default: sqlite:data/sessions.sqlite; a temp file with --demo)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default: 3)")
    parser.add_argument("--host", default="127.0.0.1", help="address the workers listen on")
    parser.add_argument("--port", type=int, default=8080, help="port of the first worker (default: 8080)")
    parser.add_argument("--webhook-url", default=os.environ.get("WEBHOOK_URL"),
                        help="the public HTTPS URL Telegram posts to (or env WEBHOOK_URL)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # SIGTERM runs the `finally` that stops the workers
    if args.demo:
        if args.store:
            demo(args.store, args.workers)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                demo(f"sqlite:{os.path.join(tmp, 'sessions.sqlite')}", args.workers)
        return
    token = os.environ.get("BOT_TOKEN")
    if not token or not args.webhook_url:
        parser.print_usage(sys.stderr)
        print("error: set BOT_TOKEN and --webhook-url (or WEBHOOK_URL) to run the bot, or pass --demo",
              file=sys.stderr)
        sys.exit(2)
    secret = secrets.token_urlsafe(32)
    workers, addresses = start_workers(args.workers, args.host, args.port, token,
                                       args.store or "sqlite:data/sessions.sqlite", secret)
    try:
        telebot.TeleBot(token).set_webhook(args.webhook_url, secret_token=secret)
        print(f"webhook {args.webhook_url} -> workers on {', '.join(f'{h}:{p}' for h, p in addresses)}; Ctrl-C stops")
        for process in workers:
            process.join()
    except KeyboardInterrupt:
        pass
    finally:
        stop_workers(workers)


if __name__ == "__main__":
    main()
