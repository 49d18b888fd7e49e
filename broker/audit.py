"""The audit trail of tokens handed out (spec §6.4, §7.3).

Counting is a dict increment on the hot path; a background task writes one aggregated event
per (caller, credential, scope set, token fingerprint, source, API) at least once a second; the
API (`via`) is `v1` or `oauth2` (the token-endpoint facade). Never the token itself: only its
fingerprint.
"""

from __future__ import annotations

import asyncio

import structlog

from broker.tasks import cancel

__all__ = ["AuditTrail"]

log = structlog.get_logger("broker.audit")

AuditKey = tuple[str, str, str, str, str, str]  # caller, credential, scope set, fingerprint, source, via


class AuditTrail:
    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._counts: dict[AuditKey, int] = {}
        self._task: asyncio.Task[None] | None = None

    def record(
        self, caller: str, credential: str, scope_set: str, fingerprint: str, source: str, via: str = "v1"
    ) -> None:
        key = (caller, credential, scope_set, fingerprint, source, via)
        self._counts[key] = self._counts.get(key, 0) + 1

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for (caller, credential, scope_set, fingerprint, source, via), count in counts.items():
            log.info(
                "audit.tokens_handed_out",
                logger="broker.audit",
                caller=caller,
                credential=credential,
                scope=scope_set,
                token_fp=fingerprint,
                source=source,
                via=via,
                count=count,
            )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tb-audit")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.flush()
