"""Mail clients set themselves up (R-OPS-5): Thunderbird autoconfig, Outlook autodiscover (the
guide's "SmartDiscover"), and the MTA-STS policy (RFC 8461) that tells other servers to deliver
to us over verified TLS only.

These are public by their nature (a client asks before it has credentials), so they are outside
the authenticated API and its OpenAPI document. They answer only for local domains (anything
else is a 404, the same as an unknown path), never name an account, and read no request body
beyond a few kilobytes: autodiscover's e-mail address is picked out with a bounded pattern, not
an XML parser (no entity expansion to abuse).
"""

from __future__ import annotations

import re
from typing import Annotated
from xml.sax.saxutils import escape

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response

from rempart.admin_api.backend import BackendDep, ProblemError
from rempart.admin_api.settings import AdminApiSettings
from rempart.common.directory import normalize_address

router = APIRouter(include_in_schema=False)

MAX_AUTODISCOVER_BODY = 8 * 1024
_EMAIL_IN_REQUEST = re.compile(rb"<EMailAddress>\s*([^<\s]{3,254})\s*</EMailAddress>", re.IGNORECASE)
_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
XML = "application/xml; charset=utf-8"


async def _local_domain(backend: BackendDep, address_or_domain: str) -> str:
    """The canonical local domain named by an address or a domain; 404 for anything else."""
    domain = address_or_domain.rpartition("@")[2].strip().lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise ProblemError(404, "Not Found")
    canonical = await backend.directory.canonical_domain(domain)
    if canonical is None:
        raise ProblemError(404, "Not Found")
    return canonical


def _settings(request: Request) -> AdminApiSettings:
    settings: AdminApiSettings = request.app.state.settings
    return settings


@router.get("/.well-known/autoconfig/mail/config-v1.1.xml")
@router.get("/mail/config-v1.1.xml")
async def thunderbird_autoconfig(
    request: Request,
    backend: BackendDep,
    emailaddress: Annotated[str, Query(max_length=254)] = "",
) -> Response:
    """Mozilla's autoconfig format: IMAP and POP3 over implicit TLS, SMTP submission over implicit
    TLS and STARTTLS, the full address as the login (R-LOG-2 works with it either way)."""
    host = request.headers.get("host", "").split(":")[0]
    domain = await _local_domain(backend, emailaddress or host.removeprefix("autoconfig."))
    s = _settings(request)
    name = escape(s.hostname)
    body = f"""<?xml version="1.0" encoding="UTF-8"?>
<clientConfig version="1.1">
  <emailProvider id="{escape(domain)}">
    <domain>{escape(domain)}</domain>
    <displayName>{escape(domain)}</displayName>
    <displayShortName>{escape(domain)}</displayShortName>
    <incomingServer type="imap">
      <hostname>{name}</hostname>
      <port>{s.public_imaps_port}</port>
      <socketType>SSL</socketType>
      <username>%EMAILADDRESS%</username>
      <authentication>password-cleartext</authentication>
    </incomingServer>
    <incomingServer type="pop3">
      <hostname>{name}</hostname>
      <port>{s.public_pop3s_port}</port>
      <socketType>SSL</socketType>
      <username>%EMAILADDRESS%</username>
      <authentication>password-cleartext</authentication>
    </incomingServer>
    <outgoingServer type="smtp">
      <hostname>{name}</hostname>
      <port>{s.public_smtps_port}</port>
      <socketType>SSL</socketType>
      <username>%EMAILADDRESS%</username>
      <authentication>password-cleartext</authentication>
    </outgoingServer>
    <outgoingServer type="smtp">
      <hostname>{name}</hostname>
      <port>{s.public_submission_port}</port>
      <socketType>STARTTLS</socketType>
      <username>%EMAILADDRESS%</username>
      <authentication>password-cleartext</authentication>
    </outgoingServer>
  </emailProvider>
</clientConfig>
"""
    return Response(body, media_type=XML)


@router.post("/autodiscover/autodiscover.xml")
@router.post("/Autodiscover/Autodiscover.xml")
async def outlook_autodiscover(request: Request, backend: BackendDep) -> Response:
    """Outlook's POX autodiscover (the 2006a response schema) for IMAP and SMTP."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_AUTODISCOVER_BODY:
            raise ProblemError(413, "The request is larger than an autodiscover request can be")
    found = _EMAIL_IN_REQUEST.search(body)
    if found is None:
        raise ProblemError(400, "No EMailAddress in the autodiscover request")
    address = normalize_address(found.group(1).decode("utf-8", "replace"))
    await _local_domain(backend, address)
    s = _settings(request)
    name, login = escape(s.hostname), escape(address)
    reply = f"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">
  <Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a">
    <Account>
      <AccountType>email</AccountType>
      <Action>settings</Action>
      <Protocol>
        <Type>IMAP</Type>
        <Server>{name}</Server>
        <Port>{s.public_imaps_port}</Port>
        <LoginName>{login}</LoginName>
        <SPA>off</SPA>
        <SSL>on</SSL>
        <AuthRequired>on</AuthRequired>
      </Protocol>
      <Protocol>
        <Type>SMTP</Type>
        <Server>{name}</Server>
        <Port>{s.public_smtps_port}</Port>
        <LoginName>{login}</LoginName>
        <SPA>off</SPA>
        <SSL>on</SSL>
        <AuthRequired>on</AuthRequired>
        <UsePOPAuth>off</UsePOPAuth>
        <SMTPLast>off</SMTPLast>
      </Protocol>
    </Account>
  </Response>
</Autodiscover>
"""
    return Response(reply, media_type=XML)


@router.get("/.well-known/mta-sts.txt")
async def mta_sts_policy(request: Request, backend: BackendDep) -> PlainTextResponse:
    """RFC 8461 3.2: served at https://mta-sts.<domain>/.well-known/mta-sts.txt for each local
    domain. ``mode`` is REMPART_MTA_STS_MODE (``testing`` by default: senders report but still
    deliver until the administrator has checked the certificates and sets ``enforce``)."""
    host = request.headers.get("host", "").split(":")[0].lower()
    if not host.startswith("mta-sts."):
        raise ProblemError(404, "Not Found")
    await _local_domain(backend, host.removeprefix("mta-sts."))
    s = _settings(request)
    mx = [m.strip() for m in (s.mta_sts_mx or s.hostname).split(",") if m.strip()]
    lines = ["version: STSv1", f"mode: {s.mta_sts_mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {s.mta_sts_max_age_seconds}"]
    # RFC 8461 3.2: CRLF line ends, text/plain.
    return PlainTextResponse("\r\n".join(lines) + "\r\n", media_type="text/plain")
