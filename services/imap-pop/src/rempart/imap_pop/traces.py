"""A trace per IMAP or POP3 command (DESIGN.md "Contracts"): a SERVER span named after the
command, with its result (IMAP OK/NO/BAD, POP3 OK/ERR), the client's address and the session
id; the auth and policy calls the command makes are its children (gRPC metadata). Its latency goes
to rempart_imap_command_seconds, with the trace id as exemplar when traced.

Never in a span: a command's arguments (LOGIN's and PASS's password, AUTHENTICATE's SASL
data, a search's text), nor a name the client made up (an unknown command is ``UNKNOWN``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from opentelemetry.trace import SpanKind

from rempart.common import metrics, tracing
from rempart.common.metrics import IMAP_COMMAND_SECONDS
from rempart.imap_pop.imapproto import Command
from rempart.imap_pop.session import Session

IMAP_COMMANDS = frozenset({
    "CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE", "SELECT", "EXAMINE", "LIST",
    "LSUB", "STATUS", "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "RENAME", "APPEND", "NAMESPACE", "ENABLE",
    "IDLE", "GETQUOTAROOT", "GETQUOTA", "SETQUOTA", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH",
    "STORE", "COPY", "MOVE",
})
POP3_COMMANDS = frozenset({
    "USER", "PASS", "AUTH", "STLS", "CAPA", "QUIT", "NOOP", "STAT", "LIST", "RETR", "DELE", "RSET", "UIDL", "TOP",
})
_POP3_RESULTS = (b"+OK", b"-ERR")


def _attributes(session: Session, command: str) -> dict[str, str | int]:
    return {
        f"rempart.{session.protocol}.command": command,
        "network.protocol.name": session.protocol,
        "client.address": session.client_ip,
        "client.port": session.client_port,
        "rempart.session.id": session.session_id,
    }


async def imap_command(session: Session, command: Command, execute: Callable[[Command], Awaitable[None]]) -> None:
    """Run ``execute(command)`` in the command's span; its result is read from the tagged line
    the command writes."""
    name = command.name if command.name in IMAP_COMMANDS else "UNKNOWN"
    if command.uid:
        name = "UID " + name
    latency = metrics.child(IMAP_COMMAND_SECONDS, name)
    if not tracing.enabled():
        with metrics.timed(latency):
            await execute(command)
        return
    tag = command.tag.encode("ascii", "replace") + b" "
    with tracing.span(f"IMAP {name}", kind=SpanKind.SERVER, parent=tracing.NEW_TRACE,
                      attributes=_attributes(session, name)) as span:
        session.stream.watch((tag + b"OK", tag + b"NO", tag + b"BAD"))
        try:
            # Inside the command's span: the observation's exemplar is this trace.
            with metrics.timed(latency):
                await execute(command)
        finally:
            line = session.stream.end_watch()
            if line:
                span.set_attribute("rempart.imap.result", line[len(tag):].split(b" ", 1)[0].decode("ascii"))


async def pop3_command(session: Session, line: str, dispatch: Callable[[str], Awaitable[None]]) -> None:
    """Run ``dispatch(line)`` in the command's span; its result is its first ``+OK``/``-ERR``."""
    if not tracing.enabled():
        await dispatch(line)
        return
    verb = line.partition(" ")[0].upper()
    name = verb if verb in POP3_COMMANDS else "UNKNOWN"
    with tracing.span(f"POP3 {name}", kind=SpanKind.SERVER, parent=tracing.NEW_TRACE,
                      attributes=_attributes(session, name)) as span:
        session.stream.watch(_POP3_RESULTS)
        try:
            await dispatch(line)
        finally:
            status = session.stream.end_watch()
            if status:
                span.set_attribute("rempart.pop3.result", "OK" if status.startswith(b"+OK") else "ERR")
