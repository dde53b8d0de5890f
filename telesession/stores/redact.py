"""``scrub``: a store URL without its password, for messages and logs (imports nothing of ours)."""
import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["scrub"]


def scrub(url: str) -> str:
    """``url`` without its password, in the authority (``user:***@host``) or a ``password=`` parameter."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            url = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "<unparsable URL>"
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)
