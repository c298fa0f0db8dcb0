"""Which failed calls are tried again, and when (the Rust client's rules, clients/rust/src/retry.rs).

- RESOURCE_EXHAUSTED carrying ``retry-after-ms`` metadata: retried for every RPC, after the
  hint plus up to 10 % jitter. The server sends the hint only when it refused the call at
  admission, before the call did anything.
- UNAVAILABLE: retried only for idempotent RPCs, after capped exponential back-off with full
  jitter, ``uniform(0, min(max_delay, base_delay * 2**attempt))``: UNAVAILABLE does not say
  whether the server acted.

Everything else is returned at once.
"""

import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import grpc

RETRY_AFTER_MS = "retry-after-ms"

#: RPCs whose repetition may change the outcome: not retried on UNAVAILABLE.
NOT_IDEMPOTENT = frozenset({
    "CreateTenant", "RotateTenantKey", "DisableKeyVersion", "EnableKeyVersion",
    "DestroyKeyVersion", "SuspendTenant", "ResumeTenant", "ScheduleTenantDeletion",
    "CancelTenantDeletion",
})

T = TypeVar("T")


def retry_after(error: grpc.RpcError) -> Optional[float]:
    """The server's ``retry-after-ms`` hint in seconds, if the error carries a valid one."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_AFTER_MS:
            try:
                return int(value) / 1000.0
            except ValueError:
                return None
    return None


@dataclass
class RetryPolicy:
    """How many times and how long to retry."""

    max_attempts: int = 4
    base_delay: float = 0.05
    max_delay: float = 2.0
    max_hint: float = 10.0

    @classmethod
    def never(cls) -> "RetryPolicy":
        """No retries at all."""
        return cls(max_attempts=1)

    def delay(self, idempotent: bool, code: grpc.StatusCode, hint: Optional[float],
              attempt: int, unit: float) -> Optional[float]:
        """Seconds to wait before attempt ``attempt + 1`` (from 0), or None to give up;
        ``unit`` is the jitter, uniform in [0, 1)."""
        if attempt + 1 >= self.max_attempts:
            return None
        unit = min(max(unit, 0.0), 1.0)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if hint is None or hint > self.max_hint:
                return None
            return hint + hint * 0.1 * unit
        if code == grpc.StatusCode.UNAVAILABLE and idempotent:
            return min(self.max_delay, self.base_delay * 2 ** attempt) * unit
        return None

    def run(self, rpc_name: str, call: Callable[[], T], sleep=time.sleep,
            rng: Callable[[], float] = random.random) -> T:
        """Runs ``call`` until it succeeds, fails for good, or the attempts are spent."""
        idempotent = rpc_name not in NOT_IDEMPOTENT
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                wait = self.delay(idempotent, error.code(), retry_after(error), attempt, rng())
                if wait is None:
                    raise
                sleep(wait)
                attempt += 1
