"""Argon2id hashing (R-PWD-2), off the event loop and with a cap on concurrent hashes.

Argon2id is memory-hard by design: one verification holds ``memory_kib`` of RAM and a core for
tens of milliseconds. Running it inline would stall every other call on the loop, and running
unbounded would let a password spray exhaust the pod, so each hash runs in a worker thread
behind a semaphore. Hashes are made by argon2-cffi and verified by libsodium where it can
(:mod:`rempart.auth.argon2id`: the same cost in about half the CPU time).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError

from rempart.auth.argon2id import verify_argon2id
from rempart.auth.metrics import HASH_SECONDS
from rempart.auth.schemes import scheme_of, verify_imported
from rempart.auth.scram import ScramKeys, derive_scram_keys
from rempart.common import metrics

T = TypeVar("T")


class CredentialHasher:
    def __init__(self, time_cost: int, memory_kib: int, parallelism: int, max_concurrent: int) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._slots = asyncio.Semaphore(max_concurrent)
        self._dummy_hash = ""
        # Every Argon2 computation this process made; tests read it to prove a refusal cost none.
        self.hash_calls = 0

    async def start(self) -> None:
        """Prepare the hash used for unknown users, so that they cost the same as a wrong password."""
        self._dummy_hash = await self.hash(secrets.token_urlsafe(24))

    async def hash(self, password: str) -> str:
        return await self._run(lambda: self._hasher.hash(password))

    async def verify(self, stored_hash: str, password: str) -> bool:
        """``stored_hash`` is a native Argon2id hash or an imported one with its scheme prefix."""

        def check() -> bool:
            if scheme_of(stored_hash):
                return verify_imported(stored_hash, password)
            return verify_argon2id(stored_hash, password)

        return await self._run(check)

    async def verify_dummy(self, password: str) -> None:
        """Spend the time of one verification and fail (R-LOG-4: no user enumeration by timing)."""
        await self.verify(self._dummy_hash, password)

    async def scram_keys(self, password: str, iterations: int) -> ScramKeys | None:
        """The SCRAM-SHA-256 keys of ``password`` (RFC 5802 section 3): PBKDF2, so a hash too."""
        return await self._run(lambda: derive_scram_keys(password, iterations))

    def needs_rehash(self, stored_hash: str) -> bool:
        if scheme_of(stored_hash):
            return True  # an imported hash: upgrade to Argon2id at the first successful login
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

    async def _run(self, fn: Callable[[], T]) -> T:
        async with self._slots:
            started = time.perf_counter()
            self.hash_calls += 1
            work = asyncio.ensure_future(asyncio.to_thread(fn))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # The caller gave up (deadline), but the thread still hashes: keep its slot until
                # it ends, or cancelled calls would let more hashes run than the cap allows.
                await asyncio.wait({work})
                raise
            finally:
                metrics.observe(HASH_SECONDS, time.perf_counter() - started)  # exemplar: the call's trace
