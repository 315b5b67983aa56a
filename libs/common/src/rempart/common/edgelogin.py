"""A login at an edge, read the same way by SMTP, IMAP and POP3 (DESIGN.md "One edge kit").

The edge asks the auth service (a password, or a SCRAM-SHA-256 conversation), tells policy the
result at STAGE_AUTH (failures count for R-IPS-2, a success records the IP for POP-before-SMTP,
R-REL-1), and reads the two together:

==========================================  ==================  ==========  =======================
auth service                                policy              the login   the session
==========================================  ==================  ==========  =======================
OK                                          ACCEPT, DISCARD     OK          goes on
OK                                          TEMPFAIL            TEMPFAIL    goes on (fail closed)
OK                                          REJECT              FAILED      goes on
any answer                                  CLOSE               FAILED      closed, policy's words
INVALID, LOCKED, IP_RESTRICTED, 2ND FACTOR  anything but CLOSE  FAILED      goes on (R-LOG-4)
TEMPFAIL, no answer, OK without an account  not asked           TEMPFAIL    goes on
==========================================  ==================  ==========  =======================

CLOSE is what policy answers when this login's failure blocked the IP and
``ips.close_blocked_connection`` is on (R-IPS-4); with it off the session goes on, as the
setting says. Each protocol words the outcome its own way: SMTP ``235``/``535``/``454`` and
policy's ``421`` before closing; IMAP ``OK``/``NO [AUTHENTICATIONFAILED]``/``NO [UNAVAILABLE]``
and ``* BYE``; POP3 ``+OK``/``-ERR Unknown user or incorrect password``/``-ERR [SYS/TEMP]``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

from prometheus_client import Counter

from rempart.common.clients import AuthClient, PolicyChecker
from rempart.common.config import LoginSettings
from rempart.common.pb.auth.v1 import auth_pb2
from rempart.common.pb.policy.v1 import policy_pb2
from rempart.common.sasl import (
    LOGIN,
    PLAIN,
    SCRAM_SHA_256,
    Challenge,
    Credentials,
    SaslMalformed,
    authzid_permitted,
    parse_client_first,
    read_login,
    read_plain,
)

log = logging.getLogger(__name__)

LOGINS = Counter("rempart_edge_logins_total", "Logins at the edges, by protocol and outcome", ["protocol", "result"])
MAX_LOGIN = 320  # RFC 5321 4.5.3.1: 64 + 1 + 255; longer names only go to logs cut

# R-LOG-4: every one of these is answered as a wrong password.
REFUSED = frozenset({
    auth_pb2.AUTH_STATUS_INVALID,
    auth_pb2.AUTH_STATUS_LOCKED,
    auth_pb2.AUTH_STATUS_IP_RESTRICTED,
    auth_pb2.AUTH_STATUS_SECOND_FACTOR_REQUIRED,
})


class LoginOutcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class LoginDecision:
    outcome: LoginOutcome
    account: str = ""  # the canonical account address, when OK
    close: bool = False  # policy closes the session
    verdict: policy_pb2.Verdict | None = None  # policy's STAGE_AUTH verdict, when it was asked


@dataclass(frozen=True)
class LoginAttempt:
    """One login at an edge: whom to ask, and the session as policy sees it before the login."""

    auth: AuthClient
    policy: PolicyChecker
    rules: LoginSettings
    facts: policy_pb2.SessionFacts
    protocol: str  # the auth service's name for it: "smtp", "imap" or "pop3"

    async def sasl(self, mechanism: str, initial: bytes | None, challenge: Challenge) -> LoginDecision:
        """AUTH / AUTHENTICATE with ``mechanism`` (PLAIN, LOGIN or SCRAM-SHA-256); ``initial`` is
        the decoded initial response, if the client sent one. Raises SaslError."""
        if mechanism == SCRAM_SHA_256:
            return await self.scram(initial, challenge)
        if mechanism == PLAIN:
            return await self.password(await read_plain(initial, challenge), PLAIN)
        if mechanism == LOGIN:
            return await self.password(await read_login(initial, challenge), LOGIN)
        raise ValueError(f"no such mechanism: {mechanism}")

    async def password(self, credentials: Credentials, mechanism: str) -> LoginDecision:
        """A name and a password: SASL PLAIN or LOGIN, IMAP LOGIN, POP3 USER/PASS."""
        if not authzid_permitted(credentials.authzid, credentials.authcid, self.rules):
            # Refused as a wrong password is: the same answer, after the same delay, and
            # counted by policy as a failed login (R-LOG-4, R-IPS-2).
            log.info("authzid refused", extra={"session": self.facts.session_id, "mechanism": mechanism})
            await asyncio.sleep(self.rules.failure_delay_ms / 1000)
            return await self.conclude(credentials.authcid, auth_pb2.AUTH_STATUS_INVALID, "", mechanism)
        reply = await self.auth.authenticate(auth_pb2.AuthenticateRequest(
            login=credentials.authcid[:MAX_LOGIN],
            password=credentials.password,
            client_ip=self.facts.client_ip,
            protocol=self.protocol,
            mechanism=mechanism,
            tls=self.facts.tls,
            session_id=self.facts.session_id,
        ))
        return await self.conclude(credentials.authcid, reply.status, reply.account, mechanism)

    async def scram(self, initial: bytes | None, challenge: Challenge) -> LoginDecision:
        """SCRAM-SHA-256 (RFC 5802, RFC 7677) through the auth service, which holds the keys,
        checks the proof and applies the authzid rule: the password never crosses the wire."""
        data = initial if initial is not None else await challenge(b"")
        client_first = _text(data)
        login = parse_client_first(client_first).username
        start = await self.auth.scram_start(auth_pb2.ScramStartRequest(
            client_first=client_first, client_ip=self.facts.client_ip, protocol=self.protocol,
            session_id=self.facts.session_id, tls=self.facts.tls,
        ))
        if start.status != auth_pb2.AUTH_STATUS_OK:
            return await self.conclude(login, start.status, "", SCRAM_SHA_256)
        client_final = _text(await challenge(start.server_first.encode()))
        finish = await self.auth.scram_finish(start.conversation_id, client_final)
        if finish.status == auth_pb2.AUTH_STATUS_OK and finish.account:
            # RFC 4422 3.6: the server-final goes as a last challenge, whose answer is empty
            # (SMTP, IMAP and POP3 have no room for data beside their success reply).
            await challenge(finish.server_final.encode())
        return await self.conclude(login, finish.status, finish.account, SCRAM_SHA_256)

    async def conclude(
        self, login: str, status: auth_pb2.AuthStatus.ValueType, account: str, mechanism: str
    ) -> LoginDecision:
        """Tell policy the auth service's answer, and read both (the table above)."""
        status_name = _status_name(status)
        success = status == auth_pb2.AUTH_STATUS_OK and bool(account)
        if not success and status not in REFUSED:
            return self._decided(LoginDecision(LoginOutcome.TEMPFAIL), mechanism, status_name)
        facts = policy_pb2.SessionFacts()
        facts.CopyFrom(self.facts)
        if success:
            facts.authenticated_account = account
        verdict = await self.policy.check(policy_pb2.CheckRequest(
            stage=policy_pb2.STAGE_AUTH, session=facts, auth_success=success, auth_login=login[:MAX_LOGIN],
            auth_failure="" if success else status_name,
        ))
        if verdict.action == policy_pb2.ACTION_CLOSE:
            decision = LoginDecision(LoginOutcome.FAILED, close=True, verdict=verdict)
        elif success and verdict.action in (policy_pb2.ACTION_ACCEPT, policy_pb2.ACTION_DISCARD):
            decision = LoginDecision(LoginOutcome.OK, account=account, verdict=verdict)
        elif success and verdict.action == policy_pb2.ACTION_TEMPFAIL:
            # Fail closed: a login that policy could not see is not a login.
            decision = LoginDecision(LoginOutcome.TEMPFAIL, verdict=verdict)
        else:
            decision = LoginDecision(LoginOutcome.FAILED, verdict=verdict)
        return self._decided(decision, mechanism, status_name if not success else "POLICY_" + verdict.rule)

    def _decided(self, decision: LoginDecision, mechanism: str, why: str) -> LoginDecision:
        LOGINS.labels(self.protocol, decision.outcome.value).inc()
        extra = {"session": self.facts.session_id, "client_ip": self.facts.client_ip, "mechanism": mechanism,
                 "result": decision.outcome.value, "close": decision.close}
        if decision.outcome is LoginOutcome.OK:
            log.info("login", extra=extra | {"account": decision.account})
        else:
            log.info("login refused", extra=extra | {"status": why})
        return decision


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslMalformed("Bad SCRAM response") from None


def _status_name(status: auth_pb2.AuthStatus.ValueType) -> str:
    try:
        return auth_pb2.AuthStatus.Name(status)
    except ValueError:
        return f"AUTH_STATUS_{int(status)}"
