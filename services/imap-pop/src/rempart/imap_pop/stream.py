"""A buffered line/literal reader over an asyncio stream, with STARTTLS.

The session reads through this buffer rather than the StreamReader so that, on STARTTLS, every
byte the client sent before the handshake can be thrown away (CVE-2011-0411: a command
pipelined in plaintext after STARTTLS must never run inside the TLS session).
"""

from __future__ import annotations

import asyncio
import ssl

READ_CHUNK = 65536
# Output queued before it is handed to the transport in one write.
OUT_BUFFERED = 64 * 1024
# A line over the limit is skipped up to its end; past this much garbage we give up.
MAX_DISCARD = 1024 * 1024


class LineTooLong(Exception):
    """The line was over the limit; it was skipped and the stream is still in step."""


class StreamDesynchronised(Exception):
    """The client sent more than we will skip: close the connection."""


class Stream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buf = bytearray()
        self._out = bytearray()
        self.tls = False
        self.tls_version = ""
        self.tls_cipher = ""
        # A command's result, for its trace span (traces.py): the first write that starts with
        # one of these prefixes is kept. None, as when tracing is off: nothing is looked at.
        self._watch: tuple[bytes, ...] | None = None
        self._watched = b""
        self._note_tls()  # a listener with implicit TLS hands over a stream that has it already

    async def _fill(self) -> bool:
        # Waiting for the client: what we have to say goes out first.
        self.flush()
        chunk = await self.reader.read(READ_CHUNK)
        if not chunk:
            return False
        self._buf += chunk
        return True

    async def ensure(self, n: int) -> bool:
        """Buffer at least ``n`` bytes; False at end of stream."""
        while len(self._buf) < n:
            if not await self._fill():
                return False
        return True

    def peek(self, n: int) -> bytes:
        return bytes(self._buf[:n])

    def consume(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def find(self, needle: bytes) -> int:
        return self._buf.find(needle)

    async def readline(self, limit: int) -> bytes | None:
        """One line without its CRLF (a bare LF is accepted); None at end of stream."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                if len(line) > limit + 1:
                    raise LineTooLong
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) > limit + 1:
                await self._skip_line()
                raise LineTooLong
            if not await self._fill():
                return None

    async def _skip_line(self) -> None:
        skipped = 0
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                del self._buf[: i + 1]
                return
            skipped += len(self._buf)
            self._buf.clear()
            if skipped > MAX_DISCARD or not await self._fill():
                raise StreamDesynchronised

    async def readexactly(self, n: int) -> bytes | None:
        if not await self.ensure(n):
            return None
        return self.consume(n)

    def pending(self) -> int:
        return len(self._buf)

    def lines_ahead(self, most: int) -> list[bytes]:
        """The whole lines the client has already sent beyond the current one (at most ``most``)."""
        return bytes(self._buf).split(b"\n", most)[:-1][:most]

    def has_line(self) -> bool:
        """A whole line from the client is already here (a pipelined command)."""
        return b"\n" in self._buf

    def write(self, data: bytes) -> None:
        """Queue output: it goes out at the next ``flush``/``drain`` (one TLS record and one
        send for a command's lines, or for the answers to several pipelined commands), or at
        once past OUT_BUFFERED bytes."""
        self._out += data
        if self._watch is not None and data.startswith(self._watch):
            self._watched, self._watch = data[:64], None
        if len(self._out) >= OUT_BUFFERED:
            self.flush()

    def watch(self, prefixes: tuple[bytes, ...]) -> None:
        """Keep the start of the next line written that begins with one of ``prefixes``."""
        self._watch, self._watched = prefixes, b""

    def end_watch(self) -> bytes:
        """What :meth:`watch` kept (b"" if nothing matched), and stop watching."""
        kept, self._watch, self._watched = self._watched, None, b""
        return kept

    def flush(self) -> None:
        if self._out:
            self.writer.write(bytes(self._out))
            self._out.clear()

    def buffered(self) -> int:
        """Output not yet sent: queued here and in the transport."""
        return len(self._out) + self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.drain()

    def close_now(self) -> None:
        """Send what is queued (a goodbye), then close."""
        self.flush()
        self.writer.close()

    def discard_pending(self) -> int:
        """Drop what the client sent ahead of now, in our buffer and in the StreamReader's."""
        dropped = len(self._buf)
        self._buf.clear()
        inner = getattr(self.reader, "_buffer", None)
        if isinstance(inner, bytearray):
            dropped += len(inner)
            inner.clear()
        return dropped

    async def start_tls(self, context: ssl.SSLContext, timeout: float, reply: bytes = b"") -> int:
        """Send ``reply`` (the go-ahead), then upgrade to TLS; returns the plaintext bytes dropped.

        Reading stops before the go-ahead is written: what is buffered then was sent before the
        client could see it (an injection), and what comes after is the client's TLS hello,
        which must reach the TLS layer rather than our buffer.
        """
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()
        dropped = self.discard_pending()
        self.write(reply)
        await self.drain()
        await self.writer.start_tls(context, ssl_handshake_timeout=timeout)
        self._note_tls()
        return dropped

    def _note_tls(self) -> None:
        sslobj = self.writer.get_extra_info("ssl_object")
        if isinstance(sslobj, ssl.SSLObject):
            self.tls = True
            self.tls_version = sslobj.version() or ""
            cipher = sslobj.cipher()
            self.tls_cipher = cipher[0] if cipher else ""

    async def linger(self, seconds: float, limit: int = 64 * 1024 * 1024, quiet: float = 0.2) -> None:
        """Read and drop input until end of stream, ``seconds``, ``limit`` bytes, or ``quiet``
        seconds without input: closing a socket with unread input sends a reset, which can
        destroy our last reply before the client reads it."""
        self._buf.clear()
        dropped = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            while dropped < limit:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                async with asyncio.timeout(min(quiet, remaining)):
                    chunk = await self.reader.read(READ_CHUNK)
                if not chunk:
                    return
                dropped += len(chunk)
        except (TimeoutError, OSError, ssl.SSLError):
            return

    async def close(self) -> None:
        if self.writer.is_closing():
            return
        self.flush()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, TimeoutError, ssl.SSLError):
            pass
