"""``rempartctl``: the daily tasks of a mail administrator, over the admin API (R-ADM-6).

    rempartctl login admin@example.org            # asks the password (and a TOTP code if needed)
    rempartctl domains list | add example.org | delete example.org
    rempartctl accounts list example.org | add bob@example.org | disable bob@example.org
    rempartctl accounts reset-password bob@example.org | unlock ... | reset-2fa ... | logout-everywhere ...
    rempartctl aliases list example.org | add sales@example.org bob@example.org carol@example.org
    rempartctl blocks list | show 192.0.2.7 | unblock 192.0.2.7 | add 192.0.2.7 --reason "abuse" [--minutes 60]
    rempartctl events [--area ips] [--limit 20] [--follow] [--json]
    rempartctl audit [--actor ...] [--kind account] [--object bob@example.org] [--action ...] [--since 2h] [--json]
    rempartctl api-keys list | create backup [--scope write] [--domain example.org] [--expires 90d] | revoke <id>
    rempartctl queue list [--state deferred] [--sender ...] [--recipient-domain ...] [--older-than 2h] [--json]
    rempartctl queue show <id> | retry <id> | delete <id>
    rempartctl settings [--scope domain:example.org] get | set ips.block_minutes=60 ... | diff
    rempartctl totp enrol                          # this login's two-step verification (R-2FA-1)
    rempartctl send-test bob@example.org [--smtp mail.example.org:25]   # a test message through port 25

The API is REMPART_API_URL (default http://127.0.0.1:8080); the session token is kept in
``$XDG_CONFIG_HOME/rempart/token`` (mode 0600), never printed, or given as REMPART_API_TOKEN.
Passwords are read from the terminal (or from standard input when it is not one), never from
the command line. Errors are
the API's problem details in one line each; the exit code is 1 for a refusal, 2 for a usage or
connection error. Settings changes send the ETag they read (If-Match): two administrators
changing settings at once never lose one of the changes silently. Lists print one line per item
for people; ``--json`` prints the API's records for scripts. Built with Typer: ``--help`` on every
command.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import smtplib
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import click
import httpx
import typer

from rempart.common.config import MailSettings

DEFAULT_URL = "http://127.0.0.1:8080"
SECOND_FACTOR = "A valid TOTP code is required"  # the API's words (routes_auth.SECOND_FACTOR)
FOLLOW_MOST = 20_000  # events --follow: at most this many read between two looks
EVENTS_PAGE = 500  # the API's largest page of events


class CtlError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _token_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "rempart" / "token"


def _describe(reply: httpx.Response) -> str:
    """A problem details answer (RFC 9457) in one line: what failed and which field."""
    try:
        problem = reply.json()
    except ValueError:
        return f"{reply.status_code} {reply.reason_phrase}"
    if not isinstance(problem, dict):
        return f"{reply.status_code} {reply.reason_phrase}"
    text = str(problem.get("detail") or problem.get("title") or reply.reason_phrase)
    fields = [f"{e.get('field', '')}: {e.get('detail', '')}" for e in problem.get("errors", []) if isinstance(e, dict)]
    return f"{reply.status_code} {text}" + (f" ({'; '.join(fields)})" if fields else "")


class Api:
    def __init__(self, url: str, token: str | None, timeout: float = 15.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            reply = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CtlError(f"cannot reach the admin API at {self.http.base_url}: {exc}", 2) from None
        if reply.status_code == 401 and path != "/v1/auth/login":
            raise CtlError("not logged in (or the session ended): run `rempartctl login <address>`")
        if reply.status_code >= 400:
            raise CtlError(_describe(reply))
        return reply

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        reply = self.call(method, path, **kwargs)
        return reply.json() if reply.content else None


def _secret(prompt: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\n")


def _print(value: Any) -> None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        for item in value:
            print(item)
        return
    print(json.dumps(value, indent=2, sort_keys=True))


def _every(api: Api, path: str, key: str, params: dict[str, Any] | None = None, most: int = 100_000) -> list[Any]:
    """Every item of a paged list (R-ADM-2: ``next_cursor``), up to ``most``."""
    items: list[Any] = []
    cursor = None
    while len(items) < most:
        page = api.json("GET", path, params={**(params or {}), **({"cursor": cursor} if cursor else {})})
        items += page.get(key, [])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return items[:most]


def _names(answer: Any, key: str) -> list[str]:
    """The names in a list answer (``{"domains": [...]}``, ``{"aliases": [{"alias": ...}]}``)."""
    items = next((v for v in answer.values() if isinstance(v, list)), []) if isinstance(answer, dict) else answer
    return [str(i.get(key, i)) if isinstance(i, dict) else str(i) for i in items]


def _assignments(pairs: list[str]) -> dict[str, Any]:
    """``ips.block_minutes=60 dns.dnsbl_zones=["a.example"]`` as a nested settings patch."""
    patch: dict[str, Any] = {}
    for pair in pairs:
        path, sep, raw = pair.partition("=")
        if not sep or not path:
            raise CtlError(f"expected section.name=value, got {pair!r}", 2)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # a bare word is a string
        node = patch
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return patch


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _settings_path(scope: str) -> str:
    if scope == "server":
        return "/v1/settings"
    kind, _, name = scope.partition(":")
    if kind in ("domain", "account") and name:
        return f"/v1/{kind}s/{name}/settings"
    raise CtlError("--scope is server, domain:<name> or account:<address>", 2)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> int:
    """``90``, ``30m``, ``2h`` or ``3d`` as seconds."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:], 0)
    number = text[:-1] if unit else text
    if not number.isdigit():
        raise CtlError(f"expected a duration like 90, 30m, 2h or 3d, got {text!r}", 2)
    return int(number) * (unit or 1)


def _queue_line(message: dict[str, Any]) -> str:
    """One queued message for people: id, arrival, sender, what still waits and the last reply."""
    waiting = [r for r in message.get("recipients", []) if r.get("state") not in ("delivered", "bounced")]
    replies = [r for r in waiting if r.get("reply_code")]
    last = f"{replies[0]['reply_code']} {replies[0].get('reply_text') or ''}".strip() if replies else ""
    states = ",".join(sorted({str(r.get("state")) for r in waiting}))
    return "  ".join([str(message.get("id")), str(message.get("first_seen")), str(message.get("sender") or "<>"),
                      f"{len(waiting)} waiting ({states}) for {','.join(message.get('destinations', []))}", last])


def _since(text: str) -> str:
    """``2h`` ago (or an RFC 3339 time as is) as an RFC 3339 time."""
    if "T" in text:
        return text
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=_seconds(text))).isoformat()




# --- the command line (Typer) ------------------------------------------------------------------
app = typer.Typer(name="rempartctl", no_args_is_help=True, add_completion=False,
                  help="Administer Rempart over its admin API (REMPART_API_URL, default http://127.0.0.1:8080).")
domains_app = typer.Typer(no_args_is_help=True, help="list, add or delete domains")
accounts_app = typer.Typer(no_args_is_help=True, help="accounts and helpdesk actions")
aliases_app = typer.Typer(no_args_is_help=True, help="list a domain's aliases or add one")
blocks_app = typer.Typer(no_args_is_help=True, help="blocked IPs (R-IPS-5)")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for scripts: list, create (shown once), revoke")
queue_app = typer.Typer(no_args_is_help=True, help="the outbound queue: list, show, retry now or delete a message")
settings_app = typer.Typer(no_args_is_help=True, help="read, change or compare settings (section.name=value ...)")
totp_app = typer.Typer(no_args_is_help=True, help="two-step verification of the account logged in (R-2FA-1)")
for _group, _name in ((domains_app, "domains"), (accounts_app, "accounts"), (aliases_app, "aliases"),
                      (blocks_app, "blocks"), (keys_app, "api-keys"), (queue_app, "queue"),
                      (settings_app, "settings"), (totp_app, "totp")):
    app.add_typer(_group, name=_name)

Json = Annotated[bool, typer.Option("--json", help="the API's records, for scripts")]


def _token() -> str | None:
    # REMPART_API_TOKEN (a session token or an API key from automation) beats the saved login.
    token_file = _token_file()
    return os.environ.get("REMPART_API_TOKEN") or (token_file.read_text().strip() if token_file.exists() else None)


def _api() -> Api:
    return Api(os.environ.get("REMPART_API_URL", DEFAULT_URL), _token())


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CtlError(f"{option} is one of {', '.join(choices)}, not {value!r}", 2)


def _needed(value: str, what: str) -> str:
    if not value:
        raise CtlError(f"{what} is needed", 2)
    return value


@app.command()
def login(address: str) -> None:
    """Log in (password, then a TOTP code when enrolled); the token is kept 0600."""
    api = _api()
    body: dict[str, Any] = {"email": address, "password": _secret("Password: ")}
    try:
        answer = api.json("POST", "/v1/auth/login", json=body)
    except CtlError as exc:
        # R-2FA-1: the password was right and a TOTP code is required: ask for it.
        if SECOND_FACTOR not in str(exc):
            raise
        body["totp_code"] = _secret("TOTP code: ")
        answer = api.json("POST", "/v1/auth/login", json=body)
    token_file = _token_file()
    token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(str(answer["token"]))
    print(f"logged in as {address}")
    if answer.get("second_factor_enrolment_required"):
        # R-2FA-1: an administrator's session does nothing else until TOTP is on.
        print("two-step verification is required for this account: run `rempartctl totp enrol`", file=sys.stderr)


@app.command()
def logout() -> None:
    """End this session and forget its token."""
    if _token():
        _api().call("POST", "/v1/auth/logout")
    _token_file().unlink(missing_ok=True)
    print("logged out")


# domains ------------------------------------------------------------------------------------------
@domains_app.command("list")
def domains_list(as_json: Json = False) -> None:
    domains = _every(_api(), "/v1/domains", "domains")
    _print(domains if as_json else _names(domains, "name"))


@domains_app.command("add")
def domains_add(name: Annotated[str, typer.Argument()] = "") -> None:
    _api().call("POST", "/v1/domains", json={"name": _needed(name, "a domain name")})
    print(f"domain {name} added")


@domains_app.command("delete")
def domains_delete(name: Annotated[str, typer.Argument()] = "") -> None:
    _api().call("DELETE", f"/v1/domains/{_needed(name, 'a domain name')}")
    print(f"domain {name} deleted")


# accounts -----------------------------------------------------------------------------------------
@accounts_app.command("list")
def accounts_list(domain: str, as_json: Json = False) -> None:
    """A domain's accounts."""
    accounts = _every(_api(), f"/v1/domains/{domain}/accounts", "accounts")
    _print(accounts if as_json else _names(accounts, "address"))


@accounts_app.command("show")
def accounts_show(address: str) -> None:
    _print(_api().json("GET", f"/v1/accounts/{address}"))


@accounts_app.command("add")
def accounts_add(address: str, role: Annotated[str, typer.Option(help="user, domain_admin or superadmin")] = "user"
                 ) -> None:
    """A new account; its password is read from the terminal (or standard input)."""
    _choice("--role", role, ("user", "domain_admin", "superadmin"))
    domain = address.rpartition("@")[2]
    body = {"address": address, "password": _secret(f"New password for {address}: "), "role": role}
    _api().call("POST", f"/v1/domains/{domain}/accounts", json=body)
    print(f"account {address} added")


@accounts_app.command("reset-password")
def accounts_reset_password(address: str) -> None:
    """A new password (read from the terminal); the account's sessions end (R-ADM-4)."""
    _api().call("PUT", f"/v1/accounts/{address}/password", json={"password": _secret(f"New password for {address}: ")})
    print(f"password of {address} reset; its sessions ended")


# The accounts' one-call actions: (method, path after /v1/accounts/<address>, body, what is said).
ACCOUNT_ACTIONS: dict[str, tuple[str, str, dict[str, Any] | None, str, str]] = {
    "disable": ("PATCH", "", {"enabled": False}, "account {address} disabled",
                "Disable an account (no login, no mail)."),
    "enable": ("PATCH", "", {"enabled": True}, "account {address} enabled", "Enable an account again."),
    "delete": ("DELETE", "", None, "account {address} deleted", "Delete an account."),
    "unlock": ("POST", "/unlock", None, "{address} unlocked", "Lift a lockout (R-LOG-1)."),
    "reset-2fa": ("DELETE", "/totp", None, "two-step verification of {address} reset; its sessions ended",
                  "Turn TOTP off for an account that lost its device (R-ADM-4)."),
    "revoke-app-passwords": ("DELETE", "/app-passwords", None, "app passwords of {address} revoked",
                             "Revoke every app password of an account."),
    "logout-everywhere": ("DELETE", "/sessions", None, "sessions of {address} ended",
                          "End every session of an account."),
}


def _account_action(name: str) -> None:
    method, suffix, body, said, doc = ACCOUNT_ACTIONS[name]

    def action(address: str) -> None:
        _api().call(method, f"/v1/accounts/{address}{suffix}", **({"json": body} if body is not None else {}))
        print(said.format(address=address))

    action.__doc__ = doc
    accounts_app.command(name)(action)


for _action in ACCOUNT_ACTIONS:
    _account_action(_action)


# aliases ------------------------------------------------------------------------------------------
@aliases_app.command("list")
def aliases_list(domain: str, as_json: Json = False) -> None:
    aliases = _every(_api(), f"/v1/domains/{domain}/aliases", "aliases")
    _print(aliases if as_json else _names(aliases, "alias"))


@aliases_app.command("add")
def aliases_add(alias: str, targets: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    if not targets:
        raise CtlError("aliases add needs at least one target", 2)
    _api().call("POST", "/v1/aliases", json={"alias": alias, "targets": targets})
    print(f"alias {alias} -> {', '.join(targets)}")


# blocks -------------------------------------------------------------------------------------------
@blocks_app.command("list")
def blocks_list(as_json: Json = False) -> None:
    blocks = _every(_api(), "/v1/ips/blocks", "blocks")
    if as_json:
        _print({"blocks": blocks})
        return
    for block in blocks:
        print("  ".join([str(block.get("ip")), str(block.get("reason")), f"until {block.get('expires_at')}"]))


@blocks_app.command("show")
def blocks_show(ip: Annotated[str, typer.Argument()] = "") -> None:
    _print(_api().json("GET", f"/v1/ips/blocks/{_needed(ip, 'an IP address')}"))


@blocks_app.command("unblock")
def blocks_unblock(ip: Annotated[str, typer.Argument()] = "") -> None:
    """Lift a block; the address's counters start again from zero."""
    _api().call("DELETE", f"/v1/ips/blocks/{_needed(ip, 'an IP address')}")
    print(f"{ip} unblocked")


@blocks_app.command("add")
def blocks_add(ip: Annotated[str, typer.Argument()] = "",
               reason: Annotated[str, typer.Option(help="why; shown in the block list")] = "",
               minutes: Annotated[int, typer.Option(help="how long; default one day")] = 1440) -> None:
    """Block an address by hand: edges close its connections and refuse new ones."""
    _needed(ip, "an IP address")
    if not reason:
        raise CtlError("blocks add needs --reason", 2)
    block = _api().json("POST", "/v1/ips/blocks", json={"ip": ip, "reason": reason, "duration_minutes": minutes})
    covers = f" (prefix {block['prefix']})" if block.get("prefix") else ""
    print(f"{block['ip']}{covers} blocked until {block['expires_at']}")


# events and audit ---------------------------------------------------------------------------------
def _event_line(event: dict[str, Any]) -> str:
    who = " ".join(x for x in (event.get("account") or "", event.get("client_ip") or "") if x)
    extra = " ".join(f"{k}={v}" for k, v in sorted((event.get("attributes") or {}).items()))
    return "  ".join(x for x in (str(event.get("time") or ""), f"{event.get('area')}/{event.get('what')}", who,
                                 str(event.get("reason") or ""), extra) if x)


@app.command()
def events(area: Annotated[str, typer.Option()] = "", account: Annotated[str, typer.Option()] = "",
           ip: Annotated[str, typer.Option()] = "", limit: Annotated[int, typer.Option(min=1, max=EVENTS_PAGE)] = 50,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="then print new events as they come")] = False,
           as_json: Json = False) -> None:
    """Recent security events, oldest first (the newest last, as a log reads)."""
    api = _api()
    params = {k: v for k, v in (("area", area), ("account", account), ("client_ip", ip)) if v}
    found = api.json("GET", "/v1/events", params={**params, "limit": limit})["events"]
    if as_json and not follow:
        _print(found)
        return
    last = 0
    while True:
        for event in sorted(found, key=lambda e: int(e["seq"])):
            if int(event["seq"]) > last:
                print(json.dumps(event, sort_keys=True) if as_json else _event_line(event), flush=True)
                last = int(event["seq"])
        if not follow:
            return
        time.sleep(2)
        found = _events_after(api, params, last)


def _events_after(api: Api, params: dict[str, str], last: int) -> list[dict[str, Any]]:
    """Every event after sequence ``last``: the newest page, then older pages back to ``last``,
    so that a burst of more than a page between two looks is not skipped."""
    out: list[dict[str, Any]] = []
    before: int | None = None
    while len(out) < FOLLOW_MOST:
        page = api.json("GET", "/v1/events", params={**params, "limit": EVENTS_PAGE,
                                                     **({"before": before} if before else {})})
        out += [e for e in page["events"] if int(e["seq"]) > last]
        before = page.get("next_before")
        if not before or int(before) <= last + 1:
            return out
    print(f"rempartctl: more than {FOLLOW_MOST} events since the last look; the oldest are not shown",
          file=sys.stderr)
    return out


@app.command()
def audit(actor: Annotated[str, typer.Option()] = "",
          kind: Annotated[str, typer.Option(help="account, alias, domain, settings, settings_list, ip_block, "
                                                 "api_key, ...")] = "",
          object_id: Annotated[str, typer.Option("--object", help="the object's id (an address, a domain, ...)")] = "",
          action: Annotated[str, typer.Option(help="account_updated, settings_changed, ...")] = "",
          since: Annotated[str, typer.Option(help="how long ago (90, 30m, 2h, 3d) or an RFC 3339 time")] = "",
          limit: Annotated[int, typer.Option(min=1)] = 50, as_json: Json = False) -> None:
    """The audit trail of administrative changes, newest first."""
    params = {k: v for k, v in (("actor", actor), ("kind", kind), ("object_id", object_id), ("action", action),
                                ("since", _since(since) if since else None), ("limit", min(limit, 500))) if v}
    records = _every(_api(), "/v1/audit", "events", params, most=limit)
    if as_json:
        _print(records)
        return
    for record in records:
        key = f" key {record['api_key']}" if record.get("api_key") else ""
        print("  ".join([str(record["time"]), f"{record['actor']} from {record['actor_ip']}{key}", record["action"],
                         f"{record['object']['kind']}:{record['object']['id']}"]))


# API keys -----------------------------------------------------------------------------------------
@keys_app.command("list")
def keys_list(as_json: Json = False) -> None:
    keys = _every(_api(), "/v1/api-keys", "api_keys")
    if as_json:
        _print(keys)
        return
    for key in keys:
        state = "expired" if key["expired"] else f"last used {key['last_used'] or 'never'} {key['last_ip'] or ''}"
        print("  ".join([key["id"], key["name"], key["scope"], key["domain"] or "(all domains)",
                         f"expires {key['expires_at'] or 'never'}", state.strip()]))


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument()] = "",
                scope: Annotated[str, typer.Option(help="read or write")] = "read",
                domain: Annotated[str, typer.Option(help="confine the key to this domain")] = "",
                expires: Annotated[str, typer.Option(help="how long it works: 30d, 12h ...; default never")] = ""
                ) -> None:
    """A key for scripts: printed once, alone on standard output (for a pipe into a secret store)."""
    _choice("--scope", scope, ("read", "write"))
    body: dict[str, Any] = {"name": _needed(name, "api-keys create needs a name"), "scope": scope}
    if domain:
        body["domain"] = domain
    if expires:
        body["expires_at"] = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=_seconds(expires))).isoformat()
    created = _api().json("POST", "/v1/api-keys", json=body)
    print(f"API key {created['id']} ({created['scope']}): shown once, keep it now", file=sys.stderr)
    print(created["key"])


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument()] = "") -> None:
    _api().call("DELETE", f"/v1/api-keys/{_needed(key_id, 'api-keys revoke needs a key id')}")
    print(f"API key {key_id} revoked")


# the outbound queue -------------------------------------------------------------------------------
@queue_app.command("list")
def queue_list(sender: Annotated[str, typer.Option(help="the envelope sender (<> for bounces)")] = "",
               sender_domain: Annotated[str, typer.Option()] = "",
               recipient_domain: Annotated[str, typer.Option(help="a domain it still waits for")] = "",
               state: Annotated[str, typer.Option(help="pending, sending or deferred")] = "",
               older_than: Annotated[str, typer.Option(help="first seen at least this long ago: 90, 30m, 2h, 3d")] = "",
               limit: Annotated[int, typer.Option(min=1)] = 100, as_json: Json = False) -> None:
    if state:
        _choice("--state", state, ("pending", "sending", "deferred"))
    api = _api()
    params: dict[str, Any] = {k: v for k, v in (("sender", sender), ("sender_domain", sender_domain),
                                                ("recipient_domain", recipient_domain), ("state", state)) if v}
    if older_than:
        params["older_than"] = _seconds(older_than)
    messages: list[dict[str, Any]] = []
    cursor = None
    while len(messages) < limit:
        page = api.json("GET", "/v1/queue", params={**params, "limit": min(limit - len(messages), 1000),
                                                    **({"cursor": cursor} if cursor else {})})
        messages += page["messages"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if as_json:
        _print(messages)
    else:
        for message in messages:
            print(_queue_line(message))


@queue_app.command("show")
def queue_show(queue_id: Annotated[str, typer.Argument()] = "") -> None:
    _print(_api().json("GET", f"/v1/queue/{_needed(queue_id, 'a queue id')}"))


@queue_app.command("retry")
def queue_retry(queue_id: Annotated[str, typer.Argument()] = "") -> None:
    due = _api().json("POST", f"/v1/queue/{_needed(queue_id, 'a queue id')}/retry")["recipients_due"]
    print(f"{queue_id}: retrying now for {', '.join(due)}")


@queue_app.command("delete")
def queue_delete(queue_id: Annotated[str, typer.Argument()] = "") -> None:
    _api().call("DELETE", f"/v1/queue/{_needed(queue_id, 'a queue id')}")
    print(f"{queue_id} deleted from the queue (not delivered, no bounce to the sender)")


# settings -----------------------------------------------------------------------------------------
@settings_app.callback()
def settings_scope(ctx: typer.Context, scope: Annotated[str, typer.Option(
        help="server, domain:<name> or account:<address>")] = "server") -> None:
    ctx.obj = scope


@settings_app.command("get")
def settings_get(ctx: typer.Context) -> None:
    _print(_api().json("GET", _settings_path(ctx.obj)))


@settings_app.command("set")
def settings_set(ctx: typer.Context, assignments: Annotated[list[str] | None, typer.Argument(
        help="section.name=value (JSON values: 60, true, [\"a\", \"b\"]; a bare word is a string)")] = None
                 ) -> None:
    """Change settings, sent with the ETag read (If-Match): a concurrent change is refused, not lost."""
    scope = ctx.obj
    api = _api()
    path = _settings_path(scope)
    patch = _assignments(_needed_list(assignments))
    current = api.call("GET", path)
    etag = current.headers.get("etag", "")
    method = "PATCH" if scope == "server" else "PUT"
    if method == "PUT":  # a domain's or account's overrides are replaced whole: merge into them
        read = current.json()
        overrides = read.get("settings", {}) if isinstance(read, dict) else {}
        patch = _merge(overrides if isinstance(overrides, dict) else {}, patch)
    api.call(method, path, json=patch, headers={"If-Match": etag} if etag else {})
    print("settings changed")


def _needed_list(values: list[str] | None) -> list[str]:
    if not values:
        raise CtlError("settings set needs section.name=value", 2)
    return values


def _flat(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for key, value in doc.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): doc}


@settings_app.command("diff")
def settings_diff(ctx: typer.Context) -> None:
    """What differs from the defaults (server), or a domain's or account's overrides, one per line:
    ``section.name: default -> value``."""
    read = _api().json("GET", _settings_path(ctx.obj))
    current = _flat(read.get("settings", read) if isinstance(read, dict) else {})
    defaults = _flat(MailSettings().model_dump(mode="json"))
    for name in sorted(current):
        if name in defaults and current[name] != defaults[name]:
            print(f"{name}: {json.dumps(defaults[name])} -> {json.dumps(current[name])}")


# two-step verification of the account logged in ---------------------------------------------------
@totp_app.command("enrol")
def totp_enrol() -> None:
    """Enrol TOTP: the key is shown once (add it to an authenticator app), then a code from the app
    confirms it and the recovery codes are printed once."""
    api = _api()
    started = api.json("POST", "/v1/me/totp")
    print(f"key: {started['secret']}\nURI (for a QR code): {started['otpauth_uri']}", file=sys.stderr)
    confirmed = api.json("POST", "/v1/me/totp/confirm", json={"code": _secret("TOTP code from the app: ")})
    print("two-step verification on; recovery codes (each works once; keep them offline):", file=sys.stderr)
    for code in confirmed.get("recovery_codes", []):
        print(code)


# a test message -----------------------------------------------------------------------------------
@app.command("send-test")
def send_test(recipient: str,
              smtp: Annotated[str, typer.Option(help="the MX listener, host:port")] = "127.0.0.1:2525",
              sender: Annotated[str, typer.Option(help="the envelope sender")] = "postmaster@rempart.invalid",
              timeout: Annotated[float, typer.Option(min=1)] = 30.0) -> None:
    """Send a test message to a local recipient through the MX listener, as any mail server would
    (no authentication), and print the server's answer with its queue id."""
    host, _, port = smtp.rpartition(":")
    if not host or not port.isdigit():
        raise CtlError("--smtp is host:port", 2)
    marker = uuid.uuid4().hex[:12]
    body = (f"From: Rempart test <{sender}>\r\nTo: <{recipient}>\r\nSubject: Rempart test message {marker}\r\n"
            f"Date: {dt.datetime.now(dt.UTC).strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
            f"Message-ID: <{marker}@rempartctl.invalid>\r\n\r\nSent by rempartctl send-test.\r\n")
    try:
        with smtplib.SMTP(host, int(port), timeout=timeout, local_hostname="rempartctl.invalid") as client:
            client.ehlo_or_helo_if_needed()
            code, text = client.mail(sender)
            if code < 400:
                code, text = client.rcpt(recipient)
            if code >= 400:
                raise CtlError(f"refused: {code} {_text(text)}")
            code, text = client.data(body.encode())
    except smtplib.SMTPResponseException as exc:
        raise CtlError(f"refused: {exc.smtp_code} {_text(exc.smtp_error)}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise CtlError(f"cannot send through {smtp}: {exc}", 2) from None
    print(f"sent to {recipient}: {code} {_text(text)} (Subject: Rempart test message {marker})")


def _text(said: bytes | str) -> str:
    return said.decode(errors="replace") if isinstance(said, bytes) else said


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="rempartctl", standalone_mode=False)
    except CtlError as exc:
        print(f"rempartctl: {exc}", file=sys.stderr)
        return exc.code
    except click.exceptions.Exit as exc:  # --help
        return int(exc.exit_code)
    except click.ClickException as exc:  # a usage error: exit 2, as argparse did
        exc.show()
        return 2
    except click.exceptions.Abort:
        print("rempartctl: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 0  # --follow ended with Ctrl-C
    return 0


if __name__ == "__main__":
    sys.exit(main())
