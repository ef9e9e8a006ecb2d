"""One TLS context per CA bundle per process, for every botocore S3 client.

aiobotocore builds a TLS context for each client's first request, and loading
the CA bundle into it is most of that request's CPU, spent even for a
plain-HTTP endpoint (``benchmarks/s3_open_cpu.py``). An agent opens a few stores per
partition it takes, so a member taking 32 partitions spent most of its
start-up building identical contexts. A context is safe to share between
connections, clients and threads; it is built again when the bundle file
changes (its path, size or modification time).
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

from aiobotocore.httpsession import AIOHTTPSession
from botocore.httpsession import get_cert_path


class SharedTLSSession(AIOHTTPSession):  # type: ignore[misc]
    """aiobotocore's HTTP session with the verifying TLS context shared. A context that
    gets more loaded into it (a client certificate; a proxy's CA bundle or certificate)
    is one of its own."""

    _own = False

    def _build_verify_context(self) -> ssl.SSLContext:
        if self._own or self._cert_file is not None or not self._verify:
            return super()._build_verify_context()  # type: ignore[no-any-return]
        path = get_cert_path(self._verify)
        return _context(self._verify, path, bundle_stamp(path) or (0, 0))

    def _setup_proxy_ssl_context(self, proxy_url: str) -> Any:
        self._own = True  # (called in one thread, under the session's lock)
        try:
            return super()._setup_proxy_ssl_context(proxy_url)
        finally:
            self._own = False


def bundle_stamp(path: str | None) -> tuple[int, int] | None:
    """A CA bundle's size and modification time, what a client built from it is cached
    by; None if there is no such file (botocore's own load says what is wrong)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if st else None


@functools.lru_cache(maxsize=8)
def _context(verify: Any, path: str | None, stamp: tuple[int, int]) -> ssl.SSLContext:
    session = AIOHTTPSession(verify=verify)
    return session._build_verify_context()  # type: ignore[no-any-return]
