"""Networking for multi-process tests."""
import socket


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
