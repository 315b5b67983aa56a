"""R-TLS-2: SCRAM-SHA-256 (RFC 5802, RFC 7677) through the real gRPC service and Redis."""

from __future__ import annotations

import base64

import pytest
from scramp import ScramClient

from rempart.auth.scram import INVALID_PROOF, derive_scram_keys
from rempart.common import keys
from rempart.common.pb.auth.v1 import auth_pb2
from rempart.common.sasl import ScramClient as KitScramClient

from .conftest import BOB, GOOD_PASSWORD, AuthHarness

# RFC 7677 section 3, the example exchange (user "user", password "pencil").
RFC_CLIENT_FIRST = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_SERVER_FIRST = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


async def start(auth: AuthHarness, client_first: str, ip: str = "192.0.2.10") -> auth_pb2.ScramStartResponse:
    reply: auth_pb2.ScramStartResponse = await auth.stub.ScramStart(
        auth_pb2.ScramStartRequest(client_first=client_first, client_ip=ip, protocol="imap", session_id="s1", tls=True),
        timeout=10,
    )
    return reply


async def finish(auth: AuthHarness, conversation_id: str, client_final: str) -> auth_pb2.ScramFinishResponse:
    reply: auth_pb2.ScramFinishResponse = await auth.stub.ScramFinish(
        auth_pb2.ScramFinishRequest(conversation_id=conversation_id, client_final=client_final), timeout=10
    )
    return reply


async def scramp_login(auth: AuthHarness, user: str, password: str, ip: str = "192.0.2.10") -> tuple[
    auth_pb2.ScramFinishResponse, ScramClient
]:
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    first = await start(auth, client.get_client_first(), ip)
    assert first.status == auth_pb2.AUTH_STATUS_OK
    client.set_server_first(first.server_first)
    return await finish(auth, first.conversation_id, client.get_client_final()), client


async def test_r_tls_2_rfc7677_example_exchange_reproduces(auth: AuthHarness) -> None:
    await auth.directory.add_account("user@example.org")
    scram = derive_scram_keys("pencil", 4096, salt=base64.b64decode(RFC_SALT))
    assert scram is not None
    await auth.redis.hset(keys.credentials("user@example.org"), "scram", scram.encode())
    auth.service.servicer.scram.nonce = lambda: RFC_SERVER_NONCE

    first = await start(auth, RFC_CLIENT_FIRST)
    assert first.status == auth_pb2.AUTH_STATUS_OK
    assert first.server_first == RFC_SERVER_FIRST
    final = await finish(auth, first.conversation_id, RFC_CLIENT_FINAL)
    assert final.status == auth_pb2.AUTH_STATUS_OK
    assert final.server_final == RFC_SERVER_FINAL
    assert final.account == "user@example.org"


async def test_r_tls_2_scramp_client_authenticates_and_verifies_server(auth: AuthHarness) -> None:
    final, client = await scramp_login(auth, BOB, GOOD_PASSWORD)
    assert final.status == auth_pb2.AUTH_STATUS_OK
    assert (final.account, final.role) == (BOB, "user")
    client.set_server_final(final.server_final)  # raises unless the server proved it knows the keys
    stored = await auth.redis.hgetall(keys.credentials(BOB))
    assert stored["scram"].startswith("SCRAM-SHA-256$4096:")
    assert GOOD_PASSWORD not in "".join(stored.values())


async def test_r_tls_2_scram_wrong_password_and_replayed_finish_refused(auth: AuthHarness) -> None:
    final, _ = await scramp_login(auth, BOB, "not-the-password")
    assert (final.status, final.server_final) == (auth_pb2.AUTH_STATUS_INVALID, "e=invalid-proof")
    client = ScramClient(["SCRAM-SHA-256"], BOB, GOOD_PASSWORD)
    first = await start(auth, client.get_client_first())
    client.set_server_first(first.server_first)
    client_final = client.get_client_final()
    assert (await finish(auth, first.conversation_id, client_final)).status == auth_pb2.AUTH_STATUS_OK
    # A conversation finishes once: the same proof again is refused.
    assert (await finish(auth, first.conversation_id, client_final)).status == auth_pb2.AUTH_STATUS_INVALID


async def test_r_log_4_scram_unknown_user_gets_stable_well_formed_server_first(auth: AuthHarness) -> None:
    known = await start(auth, "n,,n=bob@example.org,r=abcdefghijklmnop")
    unknown_1 = await start(auth, "n,,n=nobody@example.org,r=abcdefghijklmnop")
    unknown_2 = await start(auth, "n,,n=nobody@example.org,r=qrstuvwxyzabcdef")
    for reply in (known, unknown_1, unknown_2):
        assert reply.status == auth_pb2.AUTH_STATUS_OK
        nonce, salt, iterations = reply.server_first.split(",")
        assert nonce.startswith("r=") and salt.startswith("s=") and iterations == "i=4096"
        assert len(base64.b64decode(salt[2:])) == 32
    # Asking twice gives the same salt for an unknown name, as it does for a real account.
    assert unknown_1.server_first.split(",")[1] == unknown_2.server_first.split(",")[1]
    client = ScramClient(["SCRAM-SHA-256"], "nobody@example.org", "whatever")
    first = await start(auth, client.get_client_first())
    client.set_server_first(first.server_first)
    final = await finish(auth, first.conversation_id, client.get_client_final())
    assert (final.status, final.server_final) == (auth_pb2.AUTH_STATUS_INVALID, "e=invalid-proof")


async def test_r_log_1_scram_failures_lock_like_authenticate(auth: AuthHarness) -> None:
    for _ in range(4):
        final, _client = await scramp_login(auth, BOB, "same-wrong-password")
        assert final.status == auth_pb2.AUTH_STATUS_INVALID
    assert await auth.redis.get(keys.login_lock(BOB)) is None
    # A failed proof mixes in both nonces: it cannot be recognised as a repeat, so each counts.
    final, _client = await scramp_login(auth, BOB, "same-wrong-password")
    assert await auth.redis.get(keys.login_lock(BOB)) is not None
    final, _client = await scramp_login(auth, BOB, GOOD_PASSWORD)
    assert final.status == auth_pb2.AUTH_STATUS_LOCKED
    # The same rules as Authenticate: the lock holds for the password too.
    assert (await auth.login(BOB, GOOD_PASSWORD)).status == auth_pb2.AUTH_STATUS_LOCKED


@pytest.mark.parametrize("message", ["", "p=tls-unique,,n=bob,r=abc", "n,,r=abc", "x,,n=bob,r=a", "n,,n=b=ob,r=a"])
async def test_r_tls_2_scram_malformed_client_first_refused(auth: AuthHarness, message: str) -> None:
    assert (await start(auth, message)).status == auth_pb2.AUTH_STATUS_INVALID


async def test_r_tls_2_scram_over_admin_protocol_refused(auth: AuthHarness) -> None:
    reply: auth_pb2.ScramStartResponse = await auth.stub.ScramStart(
        auth_pb2.ScramStartRequest(client_first="n,,n=bob@example.org,r=abc", protocol="admin"), timeout=10
    )
    assert reply.status == auth_pb2.AUTH_STATUS_INVALID


async def kit_login(auth: AuthHarness, client: KitScramClient) -> auth_pb2.ScramFinishResponse:
    first = await start(auth, client.first())
    assert first.status == auth_pb2.AUTH_STATUS_OK
    return await finish(auth, first.conversation_id, client.final(first.server_first))


@pytest.mark.parametrize("authzid", [BOB, BOB.upper(), ""])
async def test_r_tls_2_scram_with_own_authzid_logs_in(auth: AuthHarness, authzid: str) -> None:
    """mbsync (Cyrus SASL) sends ``n,a=user@dom,n=user@dom,...``: the same identity, accepted."""
    client = KitScramClient(BOB, GOOD_PASSWORD, authzid=authzid)
    final = await kit_login(auth, client)
    assert (final.status, final.account) == (auth_pb2.AUTH_STATUS_OK, BOB)
    client.verify(final.server_final)


async def test_r_log_4_scram_with_another_authzid_refused_as_a_wrong_password(auth: AuthHarness) -> None:
    await auth.directory.add_account("alice@example.org")
    final = await kit_login(auth, KitScramClient(BOB, GOOD_PASSWORD, authzid="alice@example.org"))
    assert (final.status, final.server_final, final.account) == (auth_pb2.AUTH_STATUS_INVALID, INVALID_PROOF, "")
