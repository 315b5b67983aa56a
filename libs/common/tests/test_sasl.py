"""The edge kit's SASL (rempart.common.sasl): PLAIN, LOGIN and SCRAM-SHA-256 messages, the
authzid rule, and SCRAM's arithmetic against RFC 7677's example and an independent library."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from scramp import ScramClient as ScrampClient
from scramp import ScramMechanism

from rempart.common.config import LoginSettings
from rempart.common.sasl import (
    LOGIN_PASSWORD,
    LOGIN_USERNAME,
    Credentials,
    SaslCancelled,
    SaslMalformed,
    ScramClient,
    ScramServerUnverified,
    authzid_permitted,
    decode_response,
    escape_saslname,
    parse_client_final,
    parse_client_first,
    parse_plain,
    plain_message,
    read_login,
    read_plain,
    saslprep,
    scram_keys,
    scram_server_final,
    scram_server_first,
)

# RFC 7677 section 3, the example exchange (user "user", password "pencil").
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_CLIENT_FIRST = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_SERVER_FIRST = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

RULES = LoginSettings()
SALT = b"sixteen byte salt"


def run_server(client: ScramClient, password: str, tamper: Callable[[str], str] = str) -> str | None:
    """One conversation with the server's side as the auth service runs it (keys of ``password``);
    ``tamper`` changes the client-final on its way."""
    stored, server = scram_keys(password, SALT, 4096)
    first = parse_client_first(client.first())
    server_first = scram_server_first(first, "srv-nonce", SALT, 4096)
    final = parse_client_final(tamper(client.final(server_first)))
    return scram_server_final(first, server_first, final, stored, server)


# Client responses -----------------------------------------------------------------------------
def test_decode_response_star_cancels_and_equals_is_an_empty_initial_response() -> None:
    with pytest.raises(SaslCancelled):
        decode_response("*")
    with pytest.raises(SaslCancelled):
        decode_response(b" *\r\n")
    assert decode_response("=", initial=True) == b""
    assert decode_response("") == b""  # an empty line answers a challenge with nothing
    assert decode_response(base64.b64encode(b"\0bob\0pw").decode()) == b"\0bob\0pw"
    with pytest.raises(SaslMalformed, match="Can't decode base64"):
        decode_response("=")  # only an initial response may be "="
    with pytest.raises(SaslMalformed, match="Can't decode base64"):
        decode_response("!!notbase64")
    with pytest.raises(SaslMalformed, match="too long"):
        decode_response("QUFB" * 1000)


# PLAIN and LOGIN ------------------------------------------------------------------------------
def test_plain_fields_with_and_without_authzid() -> None:
    assert parse_plain(b"\0bob@example.org\0pw") == Credentials("bob@example.org", "pw")
    both = parse_plain("bob@example.org\0bob@example.org\0p\u00e4ss".encode())
    assert (both.authzid, both.authcid, both.password) == ("bob@example.org", "bob@example.org", "p\u00e4ss")
    assert parse_plain(plain_message(both)) == both
    assert "p\u00e4ss" not in repr(both)  # never in a log line


@pytest.mark.parametrize("message", [b"bob\0pw", b"a\0b\0c\0d", b"\0bob\0\xff\xfe", b"\0" + b"x" * 3000 + b"\0pw"])
def test_plain_malformed(message: bytes) -> None:
    with pytest.raises(SaslMalformed):
        parse_plain(message)


async def test_plain_and_login_exchanges_ask_what_clients_expect() -> None:
    asked: list[bytes] = []
    answers = [b"\0bob\0pw", b"bob", b"pw", b"pw"]

    async def challenge(data: bytes) -> bytes:
        asked.append(data)
        return answers.pop(0)

    assert await read_plain(None, challenge) == Credentials("bob", "pw")
    assert await read_login(None, challenge) == Credentials("bob", "pw")
    assert await read_login(b"bob", challenge) == Credentials("bob", "pw")  # initial response: the name
    assert asked == [b"", LOGIN_USERNAME, LOGIN_PASSWORD, LOGIN_PASSWORD]


# The authzid rule (issue 8) -------------------------------------------------------------------
@pytest.mark.parametrize(("authzid", "authcid", "permitted"), [
    ("", "bob@example.org", True),
    ("bob@example.org", "bob@example.org", True),
    ("Bob@Example.ORG", "bob@example.org", True),  # the auth service's normalisation: case
    (" bob@example.org ", "bob@example.org", True),
    ("bob%example.org", "bob@example.org", True),  # R-LOG-2: % and / for @
    ("bob/example.org", "BOB@example.org", True),
    ("alice@example.org", "bob@example.org", False),
    ("bob", "bob@example.org", False),  # a bare name is another string: no resolution here
    ("admin@example.org", "bob@example.org", False),
])
def test_r_log_2_authzid_permitted_only_for_the_same_identity(authzid: str, authcid: str, permitted: bool) -> None:
    assert authzid_permitted(authzid, authcid, RULES) is permitted


def test_r_log_2_authzid_percent_slash_follows_the_setting() -> None:
    strict = LoginSettings(convert_percent_slash=False)
    assert not authzid_permitted("bob%example.org", "bob@example.org", strict)


# SCRAM-SHA-256 messages -----------------------------------------------------------------------
def test_r_tls_2_client_first_with_authzid_as_mbsync_sends_it() -> None:
    first = parse_client_first("n,a=user@dom,n=user@dom,r=fyko+d2lbbFgONRv9qkxdawL")
    assert (first.authzid, first.username, first.nonce) == ("user@dom", "user@dom", "fyko+d2lbbFgONRv9qkxdawL")
    assert first.gs2_header == "n,a=user@dom,"
    assert first.bare == "n=user@dom,r=fyko+d2lbbFgONRv9qkxdawL"


def test_r_tls_2_client_first_names_unescaped() -> None:
    first = parse_client_first("n,a=a=2Cb,n=a=2Cb=3Dc,r=xyz")
    assert (first.username, first.authzid) == ("a,b=c", "a,b")
    assert parse_client_first("n,,n==3D2C,r=x").username == "=2C"  # escapes undone once, left to right
    assert escape_saslname("a,b=c") == "a=2Cb=3Dc"
    assert parse_client_first(f"n,,n={escape_saslname('x=2C,y')},r=n").username == "x=2C,y"


def test_r_tls_2_client_first_y_flag_and_extensions_accepted() -> None:
    first = parse_client_first("y,,n=bob,r=abc,x=extension")
    assert (first.gs2_header, first.username, first.bare) == ("y,,", "bob", "n=bob,r=abc,x=extension")


@pytest.mark.parametrize("message", [
    "", "n,,", "n", "p=tls-unique,,n=bob,r=abc", "x,,n=bob,r=a", "n,b=bob,n=bob,r=a", "n,,r=abc",
    "n,,n=b=ob,r=a", "n,,n=bob=2,r=a", "n,,n=,r=a", "n,a=,n=bob,r=a", "n,,n=bob,r=", "n,,n=bob,r=a b\x7f",
    "n,,m=mandatory,n=bob,r=abc", "n,,n=bob,r=abc,=bad", "n,,n=bob\0,r=abc", "n,,n=" + "b" * 3000 + ",r=a",
])
def test_r_tls_2_client_first_malformed(message: str) -> None:
    with pytest.raises(SaslMalformed):
        parse_client_first(message)


@pytest.mark.parametrize("message", [
    "", "c=biws,r=abc", "r=abc,c=biws,p=" + "A" * 44, "c=biws,r=abc,p=notbase64!", "c=biws,r=abc,p=AAAA",
])
def test_r_tls_2_client_final_malformed(message: str) -> None:
    with pytest.raises(SaslMalformed):
        parse_client_final(message)


# SCRAM-SHA-256 arithmetic ---------------------------------------------------------------------
def test_r_tls_2_rfc7677_example_server_side() -> None:
    stored, server = scram_keys("pencil", RFC_SALT, 4096)
    first = parse_client_first(RFC_CLIENT_FIRST)
    server_first = scram_server_first(first, RFC_SERVER_NONCE, RFC_SALT, 4096)
    assert server_first == RFC_SERVER_FIRST
    assert scram_server_final(first, server_first, parse_client_final(RFC_CLIENT_FINAL), stored, server) == (
        RFC_SERVER_FINAL)


def test_r_tls_2_rfc7677_example_client_side() -> None:
    client = ScramClient("user", "pencil", nonce=RFC_CLIENT_NONCE)
    assert client.first() == RFC_CLIENT_FIRST
    assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify(RFC_SERVER_FINAL)
    with pytest.raises(ScramServerUnverified):
        client.verify("v=" + base64.b64encode(b"\0" * 32).decode())


def test_r_tls_2_scram_with_authzid_proves_and_binds_the_authzid() -> None:
    client = ScramClient("user@dom", "secret 1!", authzid="user@dom")
    assert client.first().startswith("n,a=user@dom,n=user@dom,r=")
    server_final = run_server(client, "secret 1!")
    assert server_final is not None
    client.verify(server_final)
    # The wrong password, or a client-final whose c= drops the authzid, proves nothing.
    assert run_server(ScramClient("user@dom", "wrong", authzid="user@dom"), "secret 1!") is None
    no_authzid = "c=" + base64.b64encode(b"n,,").decode()
    assert run_server(ScramClient("user@dom", "secret 1!", authzid="user@dom"), "secret 1!",
                      lambda final: no_authzid + final[final.index(","):]) is None


def test_r_tls_2_scram_refuses_a_foreign_nonce() -> None:
    stored, server = scram_keys("pw", SALT, 4096)
    client = ScramClient("bob", "pw")
    first = parse_client_first(client.first())
    server_first = scram_server_first(first, "srv", SALT, 4096)
    final = client.final(server_first)
    other_first = scram_server_first(first, "other", SALT, 4096)
    assert scram_server_final(first, other_first, parse_client_final(final), stored, server) is None
    assert scram_server_final(first, server_first, parse_client_final(final), stored, server) is not None


@pytest.mark.parametrize("server_first", [
    "r=someone-else,s=c2FsdA==,i=4096", "r={nonce}x,s=c2FsdA==,i=1", "r={nonce}x,s=c2FsdA==,i=99999999",
    "r={nonce}x,s=!!,i=4096", "r={nonce},s=c2FsdA==,i=4096", "s=c2FsdA==,i=4096",
])
def test_scram_client_refuses_a_bad_server_first(server_first: str) -> None:
    client = ScramClient("bob", "pw", nonce="cnonce")
    with pytest.raises(SaslMalformed):
        client.final(server_first.format(nonce="cnonce"))


@pytest.mark.parametrize("password", ["correct horse 9!", "p\u00e4ss", "pa\u0308ss", "non\u00a0breaking", "soft\u00adhyphen",
                                      "\u2168 roman", "\uff21wide"])
def test_r_tls_2_keys_match_an_independent_implementation(password: str) -> None:
    """The auth service stores keys derived by scramp: the kit's client must hash alike."""
    _salt, stored, server, _i = ScramMechanism("SCRAM-SHA-256").make_auth_info(password, 4096, SALT)
    assert scram_keys(password, SALT, 4096) == (stored, server)


def test_r_tls_2_independent_client_against_the_kits_server() -> None:
    client = ScrampClient(["SCRAM-SHA-256"], "bob@example.org", "correct horse 9!")
    stored, server = scram_keys("correct horse 9!", SALT, 4096)
    first = parse_client_first(client.get_client_first())
    server_first = scram_server_first(first, "nonce-of-server", SALT, 4096)
    client.set_server_first(server_first)
    final = parse_client_final(client.get_client_final())
    server_final = scram_server_final(first, server_first, final, stored, server)
    assert server_final is not None
    client.set_server_final(server_final)  # raises unless the signature is right


def test_saslprep_maps_and_prohibits() -> None:
    assert saslprep("I\u00adX") == "IX"  # RFC 4013 section 3 examples
    assert saslprep("user") == "user"
    assert saslprep("\u00aa") == "a"
    assert saslprep("\u2168") == "IX"
    assert saslprep("a\u00a0b") == "a b"
    for bad in ("\u0007", "\u0627\u0031"):  # a control; right-to-left ending in a digit
        with pytest.raises(SaslMalformed):
            saslprep(bad)
