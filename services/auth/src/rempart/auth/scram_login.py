"""SCRAM-SHA-256 logins (RFC 7677, R-TLS-2) through the login flow's rules: the gate (name, IP
restriction, lock) runs at ScramStart, an unknown user gets a decoy server-first, and
ScramFinish refuses like Authenticate. The conversation between the two calls lives in Redis, so
any replica finishes it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable

import grpc
from redis.exceptions import RedisError

from rempart.auth.credentials import Credentials
from rempart.auth.login import MAIL_PROTOCOLS, MAX_FIELD, RESULT_LABELS, Attempt, Gate, LoginFlow, Refusal, clean_ip
from rempart.auth.login_names import LoginName
from rempart.auth.metrics import AUTH_ATTEMPTS, protocol_label
from rempart.auth.scram import INVALID_PROOF, ScramKeys, ScramMessageError, decoy_keys, finish, server_first
from rempart.common import keys
from rempart.common.pb.auth.v1 import auth_pb2
from rempart.common.sasl import SaslMalformed, authzid_permitted, parse_client_first

log = logging.getLogger(__name__)


class ScramFlow:
    def __init__(self, login: LoginFlow) -> None:
        self.login = login
        # The server nonce; a test replaces it to replay RFC 7677's example exchange.
        self.nonce: Callable[[], str] = lambda: secrets.token_urlsafe(18)

    async def start(
        self, request: auth_pb2.ScramStartRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ScramStartResponse:
        attempt = Attempt(request.client_ip, request.protocol, request.session_id, time.monotonic())
        try:
            return await self._scram_start(request, context, attempt)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("scram start tempfail: %s", type(exc).__name__,
                        extra={"session": request.session_id[:MAX_FIELD]})
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)

    async def _scram_start(
        self, request: auth_pb2.ScramStartRequest, context: grpc.aio.ServicerContext, attempt: Attempt
    ) -> auth_pb2.ScramStartResponse:
        if request.protocol not in MAIL_PROTOCOLS:
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        try:
            first = parse_client_first(request.client_first)
        except SaslMalformed:
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        client_ip = clean_ip(request.client_ip)
        gate = await self.login.gate(first.username, client_ip, context)
        refusal = gate.refusal
        if not authzid_permitted(first.authzid, first.username, self.login.runtime.config.server.login):
            # Refused at finish like a wrong password, and counted like one (rempart.common.sasl).
            refusal = refusal or Refusal(auth_pb2.AUTH_STATUS_INVALID, "authzid_differs")
        account = await self.login.account_of(gate.name)
        creds = await self.login.creds.load(account.address) if account else Credentials({})
        scram_keys = creds.scram
        if account is None or scram_keys is None or creds.totp_enabled:
            # Unknown user, no SCRAM keys yet (imported hash), or 2FA on (R-2FA-2: app passwords
            # only, and SCRAM has no way to name one): a decoy server-first, refused at finish.
            scram_keys = decoy_keys(self.login.secret, gate.subject, self.login.settings.scram_iterations)
            if refusal is None:
                refusal = Refusal(auth_pb2.AUTH_STATUS_INVALID, "unknown_user" if account is None else
                                  ("totp_app_password_only" if creds.totp_enabled else "no_scram_keys"))
        s_nonce = self.nonce()
        try:
            first_message = server_first(request.client_first, scram_keys, s_nonce)
        except ScramMessageError:
            return auth_pb2.ScramStartResponse(status=auth_pb2.AUTH_STATUS_INVALID)
        conversation_id = secrets.token_urlsafe(18)
        state = {
            "client_first": request.client_first,
            "s_nonce": s_nonce,
            "keys": scram_keys.encode(),
            "typed": gate.name.typed,
            "account": gate.name.account or "",
            "domain": gate.name.domain,
            "subject": gate.subject,
            "refusal_status": int(refusal.status) if refusal else 0,
            "refusal_reason": refusal.reason if refusal else "",
            **attempt.fields,
        }
        await self.login.redis.set(keys.scram_conversation(conversation_id), json.dumps(state),
                              ex=self.login.settings.scram_conversation_seconds)
        return auth_pb2.ScramStartResponse(
            status=auth_pb2.AUTH_STATUS_OK, conversation_id=conversation_id, server_first=first_message
        )

    async def finish(
        self, request: auth_pb2.ScramFinishRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ScramFinishResponse:
        started = time.monotonic()
        protocol = "other"
        try:
            reply, protocol = await self._scram_finish(request, context, started)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("scram finish tempfail: %s", type(exc).__name__)
            reply = auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_TEMPFAIL)
        label, result = protocol_label(protocol), RESULT_LABELS.get(reply.status, "other")
        AUTH_ATTEMPTS.labels(label, result).inc()
        self.login.stats.login(label, result)
        return reply

    async def _scram_finish(
        self, request: auth_pb2.ScramFinishRequest, context: grpc.aio.ServicerContext, started: float
    ) -> tuple[auth_pb2.ScramFinishResponse, str]:
        rules = self.login.runtime.config.server.login
        raw = None
        if request.conversation_id and len(request.conversation_id) <= MAX_FIELD:
            # GETDEL: a conversation finishes once, on whichever replica gets it.
            raw = await self.login.redis.getdel(keys.scram_conversation(request.conversation_id))
        if raw is None:
            await self.login.sleep(rules.failure_delay_ms / 1000 - (time.monotonic() - started), context)
            expired = auth_pb2.ScramFinishResponse(status=auth_pb2.AUTH_STATUS_INVALID, server_final=INVALID_PROOF)
            return expired, "other"
        state = json.loads(raw)
        attempt = Attempt(state["client_ip"], state["protocol"], state["session_id"], started)
        name = LoginName(state["typed"], state["account"] or None, state["domain"])
        gate = Gate(name, state["subject"], None)
        scram_keys = ScramKeys.decode(state["keys"])
        if scram_keys is None:
            raise ValueError("damaged SCRAM conversation")
        client_final = request.client_final

        def refused(reply: auth_pb2.AuthenticateResponse) -> tuple[auth_pb2.ScramFinishResponse, str]:
            return auth_pb2.ScramFinishResponse(status=reply.status, server_final=INVALID_PROOF), attempt.protocol

        def client_key_fingerprint() -> str:
            # A wrong proof cannot be compared across conversations (it mixes in both nonces and
            # the client's own StoredKey), so each failed SCRAM conversation counts once.
            return self.login.guard.fingerprint(gate.subject, "scram\0" + request.conversation_id)

        status, reason = int(state["refusal_status"]), str(state["refusal_reason"])
        if status:
            if status == auth_pb2.AUTH_STATUS_INVALID and reason != "slowed_down":
                await self.login.count_failure(attempt, gate, client_key_fingerprint(), rules)
            return refused(await self.login.refuse(attempt, context, name, Refusal(
                auth_pb2.AuthStatus.ValueType(status), reason), rules))
        server_final = finish(state["client_first"], scram_keys, state["s_nonce"], client_final)
        account = await self.login.directory.get_account(name.account) if name.account else None
        if server_final is None or account is None:
            await self.login.count_failure(attempt, gate, client_key_fingerprint(), rules)
            return refused(await self.login.refuse(attempt, context, name, Refusal(
                auth_pb2.AUTH_STATUS_INVALID, "bad_password"), rules))
        if not account.enabled:
            return refused(await self.login.refuse(attempt, context, name, Refusal(
                auth_pb2.AUTH_STATUS_INVALID, "account_disabled"), rules))
        client_ip = clean_ip(attempt.client_ip_raw)
        reply = await self.login.accept(attempt, account, client_ip, rules, None, None, Credentials({}))
        return auth_pb2.ScramFinishResponse(
            status=reply.status, server_final=server_final, account=reply.account, role=reply.role
        ), attempt.protocol
