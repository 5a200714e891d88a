"""The client's configuration: small typed values, each checked when it is made."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How calls that failed with UNAVAILABLE or ABORTED are retried.

    ``retries`` is how many times one call is sent again (0: never); the back-off before
    retry ``n`` is drawn between half and all of ``min(max, initial * multiplier**n)``
    seconds, so that many clients failing together do not retry in lockstep. Retries never
    outlast the call's deadline.
    """

    retries: int = 4
    backoff_initial: float = 0.2
    backoff_multiplier: float = 2.0
    backoff_max: float = 5.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, got {self.retries}")
        if (
            self.backoff_initial <= 0
            or self.backoff_max < self.backoff_initial
            or self.backoff_multiplier < 1
        ):
            raise ValueError(
                "back-off needs 0 < backoff_initial <= backoff_max and backoff_multiplier >= 1"
            )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): exponential, jittered."""
        ceiling = min(self.backoff_max, self.backoff_initial * self.backoff_multiplier**retry)
        return random.uniform(ceiling / 2, ceiling)


#: Never retry: each call is sent once.
NO_RETRIES = RetryPolicy(retries=0)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """A TLS channel: ``TlsConfig()`` verifies the server against the system's roots.

    ``root_certificates``: PEM CA certificates that sign the server's certificate (instead of
    the system's). ``certificate_chain`` + ``private_key``: the client's PEM certificate and
    key for mutual TLS. ``server_name``: the name to verify the server's certificate
    against when it differs from the host of the target.
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these settings describe."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True, slots=True)
class HeartbeatBatching:
    """Coalescing of concurrent ``record_time`` calls into ``BatchRecordTime`` calls.

    A heartbeat waits at most ``linger`` seconds for others to join it; a batch is sent at
    once when it holds ``max_batch`` heartbeats (1-1,000, the server's limit). Each caller
    still gets its own result or error, under its own deadline and request id.
    """

    linger: float = 0.002
    max_batch: int = 500

    def __post_init__(self) -> None:
        if not 0 <= self.linger <= 1:
            raise ValueError(f"linger must be between 0 and 1 second, got {self.linger}")
        if not 1 <= self.max_batch <= 1000:
            raise ValueError(f"max_batch must be between 1 and 1,000, got {self.max_batch}")
