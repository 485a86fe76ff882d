"""Webhooks: which URLs a job may name, and how a delivery is signed (the Standard Webhooks scheme).

Torch- and network-free: the API checks URLs at submission (no DNS there: an API replica must not block on a
resolver, and a name may resolve differently where the worker runs); the worker's dispatcher (service/dispatcher.py)
checks again every address the host resolves to right before each attempt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
ATTEMPTS_KEPT = 20  # delivery attempts listed on a job record (the newest)
OUTBOX_MAXLEN = 100_000  # undelivered webhook tasks kept (only reached when no dispatcher runs for a long time)
ALLOWED_SCHEMES = ("http", "https")
# Cloud instance-metadata endpoints: a webhook aimed at one would hand the response (credentials) to nobody, but
# the request itself can act with the instance's identity.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254",
                                                                "100.100.100.200"))
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, including the legacy IPv4 forms resolvers accept ('2852039166',
    '0xa9.0xfe.0xa9.0xfe'), which would otherwise slip past a check of dotted quads only."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def address_problem(address: IPAddress, allow_loopback: bool) -> str | None:
    """Why a webhook must not go to this address, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address"
    if address.is_link_local:
        return f"{address} is link-local"
    if address.is_multicast:
        return f"{address} is multicast"
    if (address.is_loopback or address.is_unspecified) and not allow_loopback:
        return f"{address} is a loopback address (webhook_allow_loopback is off)"
    return None


def _host_allowed(host: str, allowed: list[str]) -> bool:
    for pattern in (p.strip().lower().rstrip(".") for p in allowed):
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
        if host == pattern:
            return True
    return False


def url_problem(url: str, allowed_hosts: list[str], allow_loopback: bool) -> str | None:
    """Why `url` is not an acceptable webhook target at submission, or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"webhook URL longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        _ = parts.port  # a malformed port raises here
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"scheme must be http or https, got {parts.scheme or 'none'!r}"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "the URL has no host"
    if allowed_hosts and not _host_allowed(host, allowed_hosts):
        return f"host {host!r} is not in webhook_allowed_hosts"
    if host in METADATA_HOSTS:
        return f"{host} is a cloud metadata host"
    if (host in LOOPBACK_NAMES or host.endswith(".localhost")) and not allow_loopback:
        return f"{host} is a loopback host (webhook_allow_loopback is off)"
    address = _literal_address(host)
    return address_problem(address, allow_loopback) if address is not None else None


def signing_key(secret: str) -> bytes:
    """Standard Webhooks secrets are 'whsec_' + base64 key bytes; any other secret is used as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, the webhook-signature header."""
    digest = hmac.new(signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, msg_id, timestamp, body)}


def backoff_s(attempt: int, base_s: float, cap_s: float = 300.0) -> float:
    """Delay after failed attempt `attempt` (1-based): base, 2*base, 4*base, ... at most `cap_s`."""
    return min(cap_s, base_s * 2 ** (attempt - 1))
