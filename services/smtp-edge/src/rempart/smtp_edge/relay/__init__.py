"""The outbound relay (SPEC R-OUT-1..4, R-TLS-4, R-LIM-6): mail for remote recipients leaves
from here. ``app`` (the process), ``queue`` (per-recipient results, retries, bounces),
``routing`` (MX and smarthosts), ``delivery`` (one SMTP client session), ``dsn`` (RFC 3464)."""
