"""Rempart IMAP4rev1 and POP3 server on asyncio (DESIGN.md "imap-pop")."""
