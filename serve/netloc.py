"""Hosts and URLs: `host[:port]`, what counts as loopback, and which URLs may be used. Stdlib only.

One place for these policies, used by the configuration, the Host gate, the token rules and the IdP
providers alike, so they cannot drift apart.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def split_host(value: str) -> tuple[str, str | None]:
    """`host[:port]` → (host, port or None); IPv6 literals keep their brackets.

    The port is returned as written (it may not be a number: the caller decides); a bare IPv6 literal
    without brackets has no port.
    """
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return value, None
        rest = value[end + 1 :]
        if not rest:
            return value[: end + 1], None
        return value[: end + 1], rest[1:] if rest.startswith(":") else rest
    if value.count(":") != 1:
        return value, None
    host, _, port = value.partition(":")
    return host, port


def is_loopback_host(host: str) -> bool:
    """True for `localhost` itself and loopback IP literals (127.0.0.0/8, ::1; brackets allowed).

    Not `*.localhost`: RFC 6761 §6.3 only asks resolvers to answer those with loopback, and many forward
    them upstream, so `evil.localhost` may be anywhere. Nor `localhost.` (an absolute name, sent to DNS).
    """
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(url: str) -> str | None:
    """Why `url` may not be used (to reach an IdP, or to send a user to), or None when it may.

    The reason is static and never repeats the URL (it may carry a password). Rules, in order:
    printable ASCII without spaces or backslashes; http(s) with a host and a valid port; no userinfo;
    https unless the host is loopback (SPEC §5: tokens never cross the network in clear).
    """
    # RFC 3986 §2: a URI is ASCII with no whitespace. A backslash has no place in one either, and WHATWG
    # parsers (browsers) read it as "/" where urlsplit does not, so the host checked here would not be the
    # host opened: `https://evil.example\@chat.qwen.ai/`.
    if not url.isascii() or not url.isprintable() or " " in url or "\\" in url:
        return "expected a URL of printable ASCII without spaces or backslashes"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        return "expected an absolute http(s) URL"
    if parts.scheme not in ("http", "https") or not host or port == 0:
        return "expected an absolute http(s) URL"
    # RFC 9110 §4.2.4: userinfo in an http(s) URI from an untrusted source "SHOULD" be treated as an error;
    # it serves to obscure the authority (`https://chat.qwen.ai@evil.example/` goes to evil.example).
    if parts.username is not None or parts.password is not None:
        return "must not carry userinfo (user:password@ before the host)"
    if parts.scheme == "http" and not is_loopback_host(host):
        return "must use https (http is allowed only for loopback hosts)"
    return None
