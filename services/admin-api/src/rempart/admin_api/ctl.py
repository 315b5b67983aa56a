"""``rempartctl``: the daily tasks of a mail administrator, over the admin API (R-ADM-6).

    rempartctl login admin@example.org            # asks the password (and a TOTP code if needed)
    rempartctl domains list | add example.org | delete example.org
    rempartctl accounts list example.org | add bob@example.org | disable bob@example.org
    rempartctl accounts reset-password bob@example.org | unlock ... | reset-2fa ... | logout-everywhere ...
    rempartctl aliases list example.org | add sales@example.org bob@example.org carol@example.org
    rempartctl blocks list | show 192.0.2.7 | unblock 192.0.2.7 | add 192.0.2.7 --reason "abuse" [--minutes 60]
    rempartctl events [--area ips] [--limit 20]
    rempartctl audit [--actor ...] [--kind account] [--object bob@example.org] [--action ...] [--since 2h] [--json]
    rempartctl api-keys list | create backup [--scope write] [--domain example.org] [--expires 90d] | revoke <id>
    rempartctl queue list [--state deferred] [--sender ...] [--recipient-domain ...] [--older-than 2h] [--json]
    rempartctl queue show <id> | retry <id> | delete <id>
    rempartctl settings [--scope domain:example.org] get | set ips.block_minutes=60 ...

The API is REMPART_API_URL (default http://127.0.0.1:8080); the session token is kept in
``$XDG_CONFIG_HOME/rempart/token`` (mode 0600), never printed, or given as REMPART_API_TOKEN.
Passwords are read from the terminal (or from standard input when it is not one), never from
the command line. Errors are
the API's problem details in one line each; the exit code is 1 for a refusal, 2 for a usage or
connection error. Settings changes send the ETag they read (If-Match): two administrators
changing settings at once never lose one of the changes silently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
SECOND_FACTOR = "A valid TOTP code is required"  # the API's words (routes_auth.SECOND_FACTOR)


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


def run(args: argparse.Namespace) -> int:
    url = os.environ.get("REMPART_API_URL", DEFAULT_URL)
    token_file = _token_file()
    # REMPART_API_TOKEN (a session token from automation) beats the saved login.
    token = os.environ.get("REMPART_API_TOKEN") or (token_file.read_text().strip() if token_file.exists() else None)
    api = Api(url, token)
    what = args.command
    if what == "login":
        body: dict[str, Any] = {"email": args.address, "password": _secret("Password: ")}
        try:
            answer = api.json("POST", "/v1/auth/login", json=body)
        except CtlError as exc:
            # R-2FA-1: the password was right and a TOTP code is required: ask for it.
            if SECOND_FACTOR not in str(exc):
                raise
            body["totp_code"] = _secret("TOTP code: ")
            answer = api.json("POST", "/v1/auth/login", json=body)
        token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(str(answer["token"]))
        print(f"logged in as {args.address}")
        return 0
    if what == "logout":
        if token:
            api.call("POST", "/v1/auth/logout")
        token_file.unlink(missing_ok=True)
        print("logged out")
        return 0
    if what == "domains":
        if args.action == "list":
            _print(_names(_every(api, "/v1/domains", "domains"), "name"))
        elif args.action == "add":
            api.call("POST", "/v1/domains", json={"name": args.name})
            print(f"domain {args.name} added")
        else:
            api.call("DELETE", f"/v1/domains/{args.name}")
            print(f"domain {args.name} deleted")
        return 0
    if what == "accounts":
        return _accounts(api, args)
    if what == "aliases":
        if args.action == "list":
            _print(_names(_every(api, f"/v1/domains/{args.name}/aliases", "aliases"), "alias"))
        else:
            api.call("POST", "/v1/aliases", json={"alias": args.name, "targets": args.targets})
            print(f"alias {args.name} -> {', '.join(args.targets)}")
        return 0
    if what == "blocks":
        if args.action == "list":
            _print({"blocks": _every(api, "/v1/ips/blocks", "blocks")})
        elif args.action == "add":
            if not args.reason:
                raise CtlError("blocks add needs --reason", 2)
            block = api.json("POST", "/v1/ips/blocks", json={"ip": args.ip, "reason": args.reason,
                                                             "duration_minutes": args.minutes})
            covers = f" (prefix {block['prefix']})" if block.get("prefix") else ""
            print(f"{block['ip']}{covers} blocked until {block['expires_at']}")
        elif args.action == "show":
            _print(api.json("GET", f"/v1/ips/blocks/{args.ip}"))
        else:
            api.call("DELETE", f"/v1/ips/blocks/{args.ip}")
            print(f"{args.ip} unblocked")
        return 0
    if what == "events":
        params = {k: v for k, v in (("area", args.area), ("account", args.account), ("client_ip", args.ip),
                                    ("limit", args.limit)) if v}
        _print(api.json("GET", "/v1/events", params=params))
        return 0
    if what == "queue":
        return _queue(api, args)
    if what == "audit":
        return _audit(api, args)
    if what == "api-keys":
        return _api_keys(api, args)
    if what == "settings":
        path = _settings_path(args.scope)
        if args.action == "get":
            _print(api.json("GET", path))
            return 0
        current = api.call("GET", path)
        etag = current.headers.get("etag", "")
        method = "PATCH" if args.scope == "server" else "PUT"
        patch = _assignments(args.assignments)
        if method == "PUT":  # a domain's or account's overrides are replaced whole: merge into them
            read = current.json()
            overrides = read.get("settings", {}) if isinstance(read, dict) else {}
            patch = _merge(overrides if isinstance(overrides, dict) else {}, patch)
        api.call(method, path, json=patch, headers={"If-Match": etag} if etag else {})
        print("settings changed")
        return 0
    raise CtlError(f"unknown command {what}", 2)


def _accounts(api: Api, args: argparse.Namespace) -> int:
    action, name = args.action, args.name
    if action == "list":
        _print(_names(_every(api, f"/v1/domains/{name}/accounts", "accounts"), "address"))
    elif action == "show":
        _print(api.json("GET", f"/v1/accounts/{name}"))
    elif action == "add":
        domain = name.rpartition("@")[2]
        body = {"address": name, "password": _secret(f"New password for {name}: "), "role": args.role}
        api.call("POST", f"/v1/domains/{domain}/accounts", json=body)
        print(f"account {name} added")
    elif action in ("disable", "enable"):
        api.call("PATCH", f"/v1/accounts/{name}", json={"enabled": action == "enable"})
        print(f"account {name} {action}d")
    elif action == "delete":
        api.call("DELETE", f"/v1/accounts/{name}")
        print(f"account {name} deleted")
    elif action == "reset-password":
        api.call("PUT", f"/v1/accounts/{name}/password", json={"password": _secret(f"New password for {name}: ")})
        print(f"password of {name} reset; its sessions ended")
    elif action == "unlock":
        api.call("POST", f"/v1/accounts/{name}/unlock")
        print(f"{name} unlocked")
    elif action == "reset-2fa":
        api.call("DELETE", f"/v1/accounts/{name}/totp")
        print(f"two-step verification of {name} reset; its sessions ended")
    elif action == "revoke-app-passwords":
        api.call("DELETE", f"/v1/accounts/{name}/app-passwords")
        print(f"app passwords of {name} revoked")
    elif action == "logout-everywhere":
        api.call("DELETE", f"/v1/accounts/{name}/sessions")
        print(f"sessions of {name} ended")
    return 0


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


def _queue(api: Api, args: argparse.Namespace) -> int:
    if args.action == "list":
        params: dict[str, Any] = {k: v for k, v in (
            ("sender", args.sender), ("sender_domain", args.sender_domain),
            ("recipient_domain", args.recipient_domain), ("state", args.state)) if v}
        if args.older_than:
            params["older_than"] = _seconds(args.older_than)
        messages: list[dict[str, Any]] = []
        cursor = None
        while len(messages) < args.limit:
            page = api.json("GET", "/v1/queue", params={**params, "limit": min(args.limit - len(messages), 1000),
                                                        **({"cursor": cursor} if cursor else {})})
            messages += page["messages"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        if args.json:
            _print(messages)
        else:
            for message in messages:
                print(_queue_line(message))
        return 0
    path = f"/v1/queue/{args.id}"
    if args.action == "show":
        _print(api.json("GET", path))
    elif args.action == "retry":
        due = api.json("POST", f"{path}/retry")["recipients_due"]
        print(f"{args.id}: retrying now for {', '.join(due)}")
    else:
        api.call("DELETE", path)
        print(f"{args.id} deleted from the queue (not delivered, no bounce to the sender)")
    return 0


def _since(text: str) -> str:
    """``2h`` ago (or an RFC 3339 time as is) as an RFC 3339 time."""
    if "T" in text:
        return text
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=_seconds(text))).isoformat()


def _audit(api: Api, args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("actor", args.actor), ("kind", args.kind), ("object_id", args.object),
                                ("action", args.action), ("since", _since(args.since) if args.since else None),
                                ("limit", min(args.limit, 500))) if v}
    records = _every(api, "/v1/audit", "events", params, most=args.limit)
    if args.json:
        _print(records)
        return 0
    for record in records:
        key = f" key {record['api_key']}" if record.get("api_key") else ""
        print("  ".join([str(record["time"]), f"{record['actor']} from {record['actor_ip']}{key}", record["action"],
                         f"{record['object']['kind']}:{record['object']['id']}"]))
    return 0


def _api_keys(api: Api, args: argparse.Namespace) -> int:
    if args.action == "list":
        for key in _every(api, "/v1/api-keys", "api_keys"):
            state = "expired" if key["expired"] else f"last used {key['last_used'] or 'never'} {key['last_ip'] or ''}"
            print("  ".join([key["id"], key["name"], key["scope"], key["domain"] or "(all domains)",
                             f"expires {key['expires_at'] or 'never'}", state.strip()]))
        return 0
    if not args.name:
        raise CtlError(f"api-keys {args.action} needs a name (create) or an id (revoke)", 2)
    if args.action == "revoke":
        api.call("DELETE", f"/v1/api-keys/{args.name}")
        print(f"API key {args.name} revoked")
        return 0
    body: dict[str, Any] = {"name": args.name, "scope": args.scope}
    if args.domain:
        body["domain"] = args.domain
    if args.expires:
        body["expires_at"] = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=_seconds(args.expires))).isoformat()
    created = api.json("POST", "/v1/api-keys", json=body)
    # The key on standard output alone (for a pipe into a secret store); the rest on standard error.
    print(f"API key {created['id']} ({created['scope']}): shown once, keep it now", file=sys.stderr)
    print(created["key"])
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rempartctl", description="Administer Rempart over its admin API "
                                  "(REMPART_API_URL, default http://127.0.0.1:8080).")
    sub = top.add_subparsers(dest="command", required=True)
    login = sub.add_parser("login", help="log in (password, then TOTP when enrolled)")
    login.add_argument("address")
    sub.add_parser("logout", help="end this session")
    domains = sub.add_parser("domains", help="list, add or delete domains")
    domains.add_argument("action", choices=("list", "add", "delete"))
    domains.add_argument("name", nargs="?", default="")
    accounts = sub.add_parser("accounts", help="accounts and helpdesk actions")
    accounts.add_argument("action", choices=("list", "show", "add", "disable", "enable", "delete", "reset-password",
                                             "unlock", "reset-2fa", "revoke-app-passwords", "logout-everywhere"))
    accounts.add_argument("name", help="a domain (list) or an address")
    accounts.add_argument("--role", default="user", choices=("user", "domain_admin", "superadmin"))
    aliases = sub.add_parser("aliases", help="list a domain's aliases or add one")
    aliases.add_argument("action", choices=("list", "add"))
    aliases.add_argument("name", help="a domain (list) or the alias address (add)")
    aliases.add_argument("targets", nargs="*")
    blocks = sub.add_parser("blocks", help="blocked IPs (R-IPS-5)")
    blocks.add_argument("action", choices=("list", "show", "unblock", "add"))
    blocks.add_argument("ip", nargs="?", default="")
    blocks.add_argument("--reason", help="why (add); shown in the block list")
    blocks.add_argument("--minutes", type=int, default=1440, help="how long (add); default one day")
    audit = sub.add_parser("audit", help="the audit trail of administrative changes, newest first")
    audit.add_argument("--actor")
    audit.add_argument("--kind", help="account, alias, domain, settings, settings_list, ip_block, api_key, ...")
    audit.add_argument("--object", help="the object's id (an address, a domain, ...)")
    audit.add_argument("--action", help="account_updated, settings_changed, ...")
    audit.add_argument("--since", help="how long ago (90, 30m, 2h, 3d) or an RFC 3339 time")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--json", action="store_true", help="the API's records, for scripts")
    keys = sub.add_parser("api-keys", help="API keys for scripts: list, create (shown once), revoke")
    keys.add_argument("action", choices=("list", "create", "revoke"))
    keys.add_argument("name", nargs="?", default="", help="a name (create) or a key id (revoke)")
    keys.add_argument("--scope", choices=("read", "write"), default="read")
    keys.add_argument("--domain", help="confine the key to this domain")
    keys.add_argument("--expires", help="how long it works: 30d, 12h ...; default never")
    events = sub.add_parser("events", help="recent security events")
    events.add_argument("--area")
    events.add_argument("--account")
    events.add_argument("--ip")
    events.add_argument("--limit", type=int, default=50)
    queue = sub.add_parser("queue", help="the outbound queue: list, show, retry now or delete a message")
    queue.add_argument("action", choices=("list", "show", "retry", "delete"))
    queue.add_argument("id", nargs="?", default="", help="a queue id (show, retry, delete)")
    queue.add_argument("--sender", help="the envelope sender (<> for bounces)")
    queue.add_argument("--sender-domain")
    queue.add_argument("--recipient-domain", help="a domain it still waits to be delivered to")
    queue.add_argument("--state", choices=("pending", "sending", "deferred"))
    queue.add_argument("--older-than", help="first seen at least this long ago: 90, 30m, 2h, 3d")
    queue.add_argument("--limit", type=int, default=100)
    queue.add_argument("--json", action="store_true", help="the API's answer, for scripts")
    settings = sub.add_parser("settings", help="read or change settings (section.name=value ...)")
    settings.add_argument("action", choices=("get", "set"))
    settings.add_argument("assignments", nargs="*")
    settings.add_argument("--scope", default="server", help="server, domain:<name> or account:<address>")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    needs_name = {"domains": ("add", "delete"), "blocks": ("show", "unblock", "add"),
                  "queue": ("show", "retry", "delete")}
    if args.command in needs_name and args.action in needs_name[args.command] and not (
            getattr(args, "name", "") or getattr(args, "ip", "") or getattr(args, "id", "")):
        print(f"rempartctl: {args.command} {args.action} needs a name", file=sys.stderr)
        return 2
    if args.command == "aliases" and args.action == "add" and not args.targets:
        print("rempartctl: aliases add needs at least one target", file=sys.stderr)
        return 2
    try:
        return run(args)
    except CtlError as exc:
        print(f"rempartctl: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
