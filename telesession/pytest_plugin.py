"""pytest plugin of telesession, loaded through the ``pytest11`` entry point.

It only defines fixtures; ``telesession.testing`` (and with it telebot) is imported
lazily inside them, so merely having telesession installed costs pytest nothing.
"""
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:  # pragma: no cover - typing only
    from telesession.testing import FakeBotAPI

__all__ = ["fake_bot_api"]


@pytest.fixture
def fake_bot_api() -> Iterator["FakeBotAPI"]:
    """A started :class:`telesession.testing.FakeBotAPI` that telebot already points at.

    ``telebot.apihelper.API_URL`` is restored and the server stopped after the test.
    Stop your bot's polling (``bot.stop_polling()`` and join its thread) before the
    test returns: the server goes away right after it.
    """
    from telesession.testing import FakeBotAPI

    api = FakeBotAPI()
    api.start()
    try:
        yield api
    finally:
        api.stop()
