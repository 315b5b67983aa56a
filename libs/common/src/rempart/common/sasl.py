"""SASL (RFC 4422) as every edge speaks it: PLAIN (RFC 4616), LOGIN, SCRAM-SHA-256 (RFC 5802,
RFC 7677), and one rule for the authorization identity.

Written once for SMTP AUTH, IMAP AUTHENTICATE and POP3 AUTH (and for the relay, a client): the
decoding of a client response, the messages of each mechanism, the exchanges driven through a
:data:`Challenge` the protocol supplies, and SCRAM's arithmetic. The auth service holds the SCRAM
keys and checks proofs with :func:`scram_server_final`; the edges never see a key.

The authzid rule. A client may name an authorization identity (PLAIN's first field, SCRAM's
``a=``). Rempart has no proxy authorization: the one identity a user may act as is their own. So
an authzid that is empty, or equal to the authentication identity after the login-name
normalisation of R-LOG-2 (case, ``%`` and ``/`` for ``@``), is accepted on every protocol and
mechanism; any other is refused exactly as a wrong password is. Clients that always send one
(mbsync through Cyrus SASL: ``n,a=user@dom,n=user@dom,r=...``) log in as they do with Dovecot.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rempart.common.config import LoginSettings
from rempart.common.directory import normalize_address

PLAIN = "PLAIN"
LOGIN = "LOGIN"
SCRAM_SHA_256 = "SCRAM-SHA-256"

MAX_MESSAGE = 2048  # decoded bytes of one client message; real ones are about 100
MIN_ITERATIONS = 4096  # RFC 7677 section 4
MAX_ITERATIONS = 1_000_000  # a client never lets a server make it hash for minutes
LOGIN_USERNAME = b"Username:"  # the LOGIN mechanism's two challenges, as every client expects them
LOGIN_PASSWORD = b"Password:"


class SaslError(Exception):
    """The exchange cannot go on; the protocol answers with its syntax error."""


class SaslCancelled(SaslError):
    """The client answered a challenge with ``*`` (RFC 4422 section 3.5)."""

    def __init__(self) -> None:
        super().__init__("Authentication cancelled")


class SaslMalformed(SaslError):
    """Not base64, not UTF-8, too long, or not the mechanism's syntax. The text is for the client."""


class ScramServerUnverified(SaslError):
    """SCRAM client side: the server did not prove that it knows the password's keys."""


# Send the server's bytes as a challenge (the protocol base64-encodes them) and return the
# client's decoded answer; raises SaslCancelled, SaslMalformed, or ConnectionError if it left.
Challenge = Callable[[bytes], Awaitable[bytes]]


def decode_response(line: str | bytes, *, initial: bool = False) -> bytes:
    """A client response as IMAP, POP3 and SMTP carry it: base64, ``*`` to cancel, and ``=`` for
    an empty initial response (RFC 4954 section 4, RFC 4959, RFC 5034 section 4)."""
    text = (line.decode("ascii", "replace") if isinstance(line, bytes) else line).strip()
    if text == "*":
        raise SaslCancelled
    if initial and text == "=":
        return b""
    if len(text) > 4 * (MAX_MESSAGE // 3 + 1):
        raise SaslMalformed("Response too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SaslMalformed("Can't decode base64") from None


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslMalformed("Response is not UTF-8") from None


# The authorization identity ------------------------------------------------------------------
def normalize_login(login: str, rules: LoginSettings) -> str:
    """A login name as the auth service resolves it (R-LOG-2): trimmed, lower case, and with
    ``convert_percent_slash``, ``bob%example.org`` or ``bob/example.org`` for ``bob@example.org``."""
    name = normalize_address(login)
    if rules.convert_percent_slash and "@" not in name:
        name = name.replace("%", "@").replace("/", "@")
    return name


def authzid_permitted(authzid: str, authcid: str, rules: LoginSettings) -> bool:
    """The one authzid rule (see the module's text): empty, or the authentication identity."""
    return not authzid or normalize_login(authzid, rules) == normalize_login(authcid, rules)


# PLAIN and LOGIN ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    authcid: str
    password: str = field(repr=False)
    authzid: str = ""


def parse_plain(message: bytes) -> Credentials:
    """RFC 4616 section 2: ``[authzid] NUL authcid NUL passwd``, each UTF-8."""
    fields = message.split(b"\0")
    if len(message) > MAX_MESSAGE or len(fields) != 3:
        raise SaslMalformed("Bad PLAIN response")
    authzid, authcid, password = (_utf8(f) for f in fields)
    return Credentials(authcid, password, authzid)


def plain_message(credentials: Credentials) -> bytes:
    """PLAIN, client side."""
    return "\0".join((credentials.authzid, credentials.authcid, credentials.password)).encode()


async def read_plain(initial: bytes | None, challenge: Challenge) -> Credentials:
    """PLAIN, server side: the initial response, or the answer to an empty challenge."""
    return parse_plain(initial if initial is not None else await challenge(b""))


async def read_login(initial: bytes | None, challenge: Challenge) -> Credentials:
    """LOGIN (draft-murchison-sasl-login): the user name (or the initial response), then the
    password, each the answer to its own challenge. LOGIN has no authzid."""
    username = initial if initial is not None else await challenge(LOGIN_USERNAME)
    password = await challenge(LOGIN_PASSWORD)
    if len(username) > MAX_MESSAGE or len(password) > MAX_MESSAGE:
        raise SaslMalformed("Response too long")
    return Credentials(_utf8(username), _utf8(password))


# SCRAM-SHA-256 messages -----------------------------------------------------------------------
@dataclass(frozen=True)
class ScramClientFirst:
    gs2_header: str  # "n,," or "n,a=<authzid>,": the client-final's c= must repeat it
    authzid: str  # unescaped
    username: str  # unescaped
    nonce: str
    bare: str  # client-first-message-bare: the start of the AuthMessage


@dataclass(frozen=True)
class ScramClientFinal:
    channel_binding: str  # the c= value: base64 of the gs2 header (no channel binding data)
    nonce: str
    without_proof: str  # client-final-message-without-proof: the end of the AuthMessage
    proof: bytes


def parse_client_first(message: str) -> ScramClientFirst:
    """RFC 5802 section 7: ``gs2-header client-first-message-bare``."""
    if not message or len(message) > MAX_MESSAGE:
        raise SaslMalformed("Bad SCRAM response")
    parts = message.split(",", 2)
    if len(parts) != 3:
        raise SaslMalformed("Bad SCRAM response")
    flag, authz, bare = parts
    # "p=..." asks for channel binding: SCRAM-SHA-256-PLUS is not offered. "y" says the client
    # could bind but believes the server cannot, which is true here.
    if flag not in ("n", "y") or (authz and not authz.startswith("a=")):
        raise SaslMalformed("Bad SCRAM response")
    authzid = _saslname(authz[2:]) if authz else ""
    attributes = bare.split(",")
    # An "m=" first is a mandatory extension this server does not know: it must fail (5.1).
    if len(attributes) < 2 or not attributes[0].startswith("n=") or not attributes[1].startswith("r="):
        raise SaslMalformed("Bad SCRAM response")
    nonce = attributes[1][2:]
    if not _printable(nonce) or not all(_is_extension(a) for a in attributes[2:]):
        raise SaslMalformed("Bad SCRAM response")
    return ScramClientFirst(f"{flag},{authz},", authzid, _saslname(attributes[0][2:]), nonce, bare)


def parse_client_final(message: str) -> ScramClientFinal:
    """RFC 5802 section 7: ``c=<binding>,r=<nonce>[,extensions],p=<proof>``."""
    if not message or len(message) > MAX_MESSAGE:
        raise SaslMalformed("Bad SCRAM response")
    without_proof, sep, proof_b64 = message.rpartition(",p=")
    attributes = without_proof.split(",")
    if not sep or len(attributes) < 2 or not attributes[0].startswith("c=") or not attributes[1].startswith("r="):
        raise SaslMalformed("Bad SCRAM response")
    try:
        proof = base64.b64decode(proof_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SaslMalformed("Bad SCRAM response") from None
    if len(proof) != hashlib.sha256().digest_size or not all(_is_extension(a) for a in attributes[2:]):
        raise SaslMalformed("Bad SCRAM response")
    return ScramClientFinal(attributes[0][2:], attributes[1][2:], without_proof, proof)


def escape_saslname(name: str) -> str:
    """RFC 5802 section 5.1: "," is sent as "=2C" and "=" as "=3D"."""
    return name.replace("=", "=3D").replace(",", "=2C")


def _saslname(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "=":
            escaped = {"=2C": ",", "=3D": "="}.get(text[i:i + 3])
            if escaped is None:
                raise SaslMalformed("Bad SCRAM response")
            out.append(escaped)
            i += 3
        else:
            out.append(text[i])
            i += 1
    if not out or "\0" in out:
        raise SaslMalformed("Bad SCRAM response")
    return "".join(out)


def _printable(value: str) -> bool:
    # RFC 5802 section 7: printable = %x21-2B / %x2D-7E, i.e. visible ASCII except ","
    return bool(value) and all("\x21" <= c <= "\x7e" and c != "," for c in value)


def _is_extension(attribute: str) -> bool:
    return len(attribute) >= 2 and attribute[0].isascii() and attribute[0].isalpha() and attribute[1] == "="


def _attribute(message: str, name: str) -> str:
    for attribute in message.split(","):
        if attribute.startswith(name + "="):
            return attribute[len(name) + 1:]
    raise SaslMalformed("Bad SCRAM response")


# SCRAM-SHA-256 arithmetic (RFC 5802 section 3) ------------------------------------------------
def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    # Hi() is PBKDF2 with HMAC-SHA-256 and one block of output (RFC 5802 section 2.2).
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode(), salt, iterations)


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) of a password."""
    salted = _salted_password(password, salt, iterations)
    return hashlib.sha256(_hmac(salted, "Client Key")).digest(), _hmac(salted, "Server Key")


def scram_server_first(first: ScramClientFirst, server_nonce: str, salt: bytes, iterations: int) -> str:
    return f"r={first.nonce}{server_nonce},s={base64.b64encode(salt).decode()},i={iterations}"


def scram_server_final(
    first: ScramClientFirst, server_first: str, final: ScramClientFinal, stored_key: bytes, server_key: bytes
) -> str | None:
    """The server-final message ``v=<ServerSignature>`` when the client's proof is right, None
    when it is not, or when the client-final does not continue this conversation."""
    if final.channel_binding != base64.b64encode(first.gs2_header.encode()).decode():
        return None  # c= must repeat the gs2 header, authzid included (5.1)
    if final.nonce != _attribute(server_first, "r"):
        return None
    auth_message = f"{first.bare},{server_first},{final.without_proof}"
    client_key = bytes(a ^ b for a, b in zip(final.proof, _hmac(stored_key, auth_message), strict=True))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        return None
    return "v=" + base64.b64encode(_hmac(server_key, auth_message)).decode()


class ScramClient:
    """SCRAM-SHA-256, client side, with an authzid if wanted: :meth:`first`, :meth:`final` with
    the server-first, then :meth:`verify` with the server-final (the server proves itself too)."""

    def __init__(self, username: str, password: str, authzid: str = "", nonce: str | None = None) -> None:
        self._password = password
        self._gs2 = f"n,{'a=' + escape_saslname(authzid) if authzid else ''},"
        self._nonce = nonce or secrets.token_urlsafe(18)
        self._bare = f"n={escape_saslname(username)},r={self._nonce}"
        self._server_signature = ""

    def first(self) -> str:
        return self._gs2 + self._bare

    def final(self, server_first: str) -> str:
        nonce, salt_b64, iterations_text = (_attribute(server_first, name) for name in ("r", "s", "i"))
        try:
            salt = base64.b64decode(salt_b64, validate=True)
            iterations = int(iterations_text)
        except (binascii.Error, ValueError):
            raise SaslMalformed("Bad server-first message") from None
        if not nonce.startswith(self._nonce) or nonce == self._nonce or not (
                MIN_ITERATIONS <= iterations <= MAX_ITERATIONS):
            raise SaslMalformed("Bad server-first message")
        salted = _salted_password(self._password, salt, iterations)
        client_key, server_key = _hmac(salted, "Client Key"), _hmac(salted, "Server Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={base64.b64encode(self._gs2.encode()).decode()},r={nonce}"
        auth_message = f"{self._bare},{server_first},{without_proof}"
        proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored_key, auth_message), strict=True))
        self._server_signature = "v=" + base64.b64encode(_hmac(server_key, auth_message)).decode()
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def verify(self, server_final: str) -> None:
        if not self._server_signature or not hmac.compare_digest(server_final.encode(),
                                                                 self._server_signature.encode()):
            raise ScramServerUnverified(server_final[:64])


def saslprep(text: str) -> str:
    """RFC 4013 (a stringprep profile, RFC 3454) for query strings: what SCRAM hashes."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    prepared = unicodedata.normalize("NFKC", mapped)
    for c in prepared:
        if _prohibited(c):
            raise SaslMalformed("Prohibited character in password")
    # RFC 3454 section 6: right-to-left text is all RandALCat, which it starts and ends with.
    if any(stringprep.in_table_d1(c) for c in prepared) and (
        any(stringprep.in_table_d2(c) for c in prepared)
        or not stringprep.in_table_d1(prepared[0]) or not stringprep.in_table_d1(prepared[-1])
    ):
        raise SaslMalformed("Bad bidirectional text in password")
    return prepared


def _prohibited(c: str) -> bool:
    return (
        stringprep.in_table_c12(c) or stringprep.in_table_c21_c22(c) or stringprep.in_table_c3(c)
        or stringprep.in_table_c4(c) or stringprep.in_table_c5(c) or stringprep.in_table_c6(c)
        or stringprep.in_table_c7(c) or stringprep.in_table_c8(c) or stringprep.in_table_c9(c)
    )
