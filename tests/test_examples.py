"""The examples are documentation that runs: each one's ``--demo`` must pass, as a user would run it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["counter_bot.py", "form_bot.py", "webhook_bot.py", "states_bot.py"]


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BOT_TOKEN", "WEBHOOK_URL")}
    return subprocess.run([sys.executable, os.path.join("examples", name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def passed(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_counter_bot_demo(tmp_path):
    data = tmp_path / "sessions"
    out = passed(run_example("counter_bot.py", "--demo", "--data", str(data)))
    assert "400 /count updates in 40 chats" in out
    assert "every chat's replies are 1..N in order and its stored count is N: exact" in out
    assert "counts survive and continue" in out
    assert "the next /count replied 1" in out
    assert out.rstrip().endswith("OK: all counts exact")
    assert len(list(data.glob("*.json"))) == 40  # one session file per chat, in the --data directory


def test_counter_bot_demo_refuses_a_used_directory(tmp_path):
    (tmp_path / "1.json").write_text("{}")
    result = run_example("counter_bot.py", "--demo", "--data", str(tmp_path))
    assert result.returncode == 1
    assert "not empty" in result.stderr


def test_form_bot_demo():
    out = passed(run_example("form_bot.py", "--demo"))
    assert "in 13 chats (one group)" in out
    assert "replies was the expected one, in the sender's language" in out
    assert "user 302: 'vingt'     -> 'Envoie ton âge en chiffres, par ex. 42.'" in out
    assert "user 301: '[yes]'     -> 'Danke, Dana K.! Dein Formular ist gespeichert.'" in out
    assert "13 forms done" in out and "15 languages" in out
    assert "all forms and languages exact" in out


def test_webhook_bot_demo_sqlite():
    out = passed(run_example("webhook_bot.py", "--demo"))
    assert "600 updates of 40 chats" in out and "3 worker processes" in out and "store sqlite:" in out
    assert "all 600 requests answered 200" in out
    assert "every chat got replies 1..15 in order and its stored count grew by exactly 15" in out
    assert "workers stopped" in out
    assert out.rstrip().endswith("OK: all counts exact")


@pytest.mark.redis
def test_webhook_bot_demo_redis(redis_store_url):
    out = passed(run_example("webhook_bot.py", "--demo", "--store", redis_store_url))
    assert f"store {redis_store_url}" in out
    assert "stored count grew by exactly 15, across 3 processes" in out


@pytest.mark.parametrize("name", EXAMPLES)
def test_without_token_prints_usage(name):
    result = run_example(name, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ")
    assert "BOT_TOKEN" in result.stderr and "--demo" in result.stderr
    assert result.stdout == ""


def test_states_bot_demo():
    out = passed(run_example("states_bot.py", "--demo"))
    assert "10 users fill a States V2 form concurrently" in out
    assert "/tap replied 1..80 once each, stored taps = 80" in out
    assert "stored: 10 forms in state Form:done" in out
    assert "after a restart, user 498 answered the age question it was asked before" in out
    assert out.rstrip().endswith("OK: 11 forms and 80 concurrent taps exact")
