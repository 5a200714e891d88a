"""Host and port spellings: IPv6 literals in brackets for gRPC, bare for everything else."""

from __future__ import annotations

import ipaddress

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def bare_host(host: str) -> str:
    """``[::]`` -> ``::``: the form sockets and HTTP servers take."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(bare_host(host)).version == 6
    except ValueError:
        return False


def host_port(host: str, port: int | str) -> str:
    """A ``host:port`` target or listen address; IPv6 literals in brackets (``[::1]:50051``)."""
    host = bare_host(host)
    return f"[{host}]:{port}" if is_ipv6(host) else f"{host}:{port}"


def dial_host(listen_host: str) -> str:
    """Where a local probe reaches a server listening on ``listen_host``: a wildcard
    (``0.0.0.0``, ``::``) means loopback, any other address is dialled as it is."""
    host = bare_host(listen_host)
    if host in _WILDCARDS:
        return "127.0.0.1"  # a gRPC server on [::] accepts IPv4 too (dual stack)
    return host
