"""Client autoconfiguration and MTA-STS (R-OPS-5): Thunderbird autoconfig, Outlook autodiscover,
the MTA-STS policy; answered for local domains only, without authentication."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from .conftest import Harness


async def _domains(harness: Harness) -> None:
    # The harness has example.org already (its admin's domain); example.net is an alias of it.
    if not await harness.backend.directory.is_local_domain("example.org"):
        await harness.backend.directory.add_domain("example.org")
    await harness.backend.directory.add_domain_alias("example.net", "example.org")


async def test_r_ops_5_thunderbird_autoconfig_for_a_local_domain(harness: Harness) -> None:
    await _domains(harness)
    reply = await harness.http.get("/.well-known/autoconfig/mail/config-v1.1.xml",
                                   params={"emailaddress": "Bob@Example.org"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(reply.content)  # noqa: S314 - our own answer, in a test
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == "example.org"
    servers = {(s.get("type"), s.findtext("port"), s.findtext("socketType")) for s in
               [*provider.iter("incomingServer"), *provider.iter("outgoingServer")]}
    assert servers == {("imap", "993", "SSL"), ("pop3", "995", "SSL"), ("smtp", "465", "SSL"),
                       ("smtp", "587", "STARTTLS")}
    assert {s.findtext("hostname") for s in provider.iter("incomingServer")} == {harness.settings.hostname}
    # A domain alias is set up as its domain; the autoconfig.<domain> host works without a query.
    alias = await harness.http.get("/mail/config-v1.1.xml", headers={"host": "autoconfig.example.net"})
    assert alias.status_code == 200 and b'<emailProvider id="example.org">' in alias.content


async def test_r_ops_5_autoconfig_says_nothing_about_other_domains(harness: Harness) -> None:
    await _domains(harness)
    for query in ("someone@elsewhere.test", "x@<script>", ""):
        reply = await harness.http.get("/.well-known/autoconfig/mail/config-v1.1.xml",
                                       params={"emailaddress": query}, headers={"host": "mail.example.org"})
        assert reply.status_code == 404, query


async def test_r_ops_5_outlook_autodiscover(harness: Harness) -> None:
    await _domains(harness)
    request = (b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/'
               b'autodiscover/outlook/requestschema/2006"><Request><EMailAddress>carol@example.net</EMailAddress>'
               b"<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/"
               b"responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>")
    reply = await harness.http.post("/autodiscover/autodiscover.xml", content=request)
    assert reply.status_code == 200
    ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    protocols = ET.fromstring(reply.content).findall(".//a:Protocol", ns)  # noqa: S314 - our own answer
    assert [(p.findtext("a:Type", namespaces=ns), p.findtext("a:Port", namespaces=ns),
             p.findtext("a:SSL", namespaces=ns), p.findtext("a:LoginName", namespaces=ns)) for p in protocols] == [
        ("IMAP", "993", "on", "carol@example.net"), ("SMTP", "465", "on", "carol@example.net")]
    foreign = request.replace(b"carol@example.net", b"carol@elsewhere.test")
    assert (await harness.http.post("/Autodiscover/Autodiscover.xml", content=foreign)).status_code == 404
    assert (await harness.http.post("/autodiscover/autodiscover.xml", content=b"<x/>")).status_code == 400
    # No XML parser sees the body: entities are not expanded, a huge body is refused.
    bomb = b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">]><EMailAddress>&a;@example.org</EMailAddress>'
    expanded = await harness.http.post("/autodiscover/autodiscover.xml", content=bomb)
    assert b"<LoginName>&amp;a;@example.org</LoginName>" in expanded.content and b"aaaaaaaaaa" not in expanded.content
    huge = b"<EMailAddress>" + b"a" * 20_000 + b"</EMailAddress>"
    assert (await harness.http.post("/autodiscover/autodiscover.xml", content=huge)).status_code == 413


async def test_r_ops_5_mta_sts_policy_for_each_local_domain(harness: Harness) -> None:
    await _domains(harness)
    reply = await harness.http.get("/.well-known/mta-sts.txt", headers={"host": "mta-sts.example.org"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    assert reply.text == (f"version: STSv1\r\nmode: testing\r\nmx: {harness.settings.hostname}\r\n"
                          "max_age: 604800\r\n")
    for host in ("mta-sts.elsewhere.test", "mail.example.org"):
        assert (await harness.http.get("/.well-known/mta-sts.txt", headers={"host": host})).status_code == 404
