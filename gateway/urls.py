"""The one rule for URLs the gateway calls out to (webhooks, the fetch tool): HTTPS, or plain HTTP only to
this machine's loopback, where there is no network to read it on (a local stand-in, a sidecar)."""

from __future__ import annotations

import httpx

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def outbound_url(url: str) -> httpx.URL:
    """The URL parsed as httpx will connect to it, or ValueError saying why it is refused."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    if not parsed.host:
        raise ValueError(f"no host in {url!r}")
    if parsed.userinfo:
        raise ValueError(f"credentials in a URL are refused (put them in headers): {parsed.host}")
    if parsed.scheme == "https" or (parsed.scheme == "http" and parsed.host.lower() in LOOPBACK_HOSTS):
        return parsed
    raise ValueError(f"{url!r}: only https:// (or http:// to 127.0.0.1/localhost) is allowed")
