"""Every console page parsed as a browser would (issue 14, "accessible"): each field a person
fills in has a label with words in it, ids are unique (a duplicate breaks ``label for``), the
first thing the keyboard reaches is a skip link to the content, no positive ``tabindex`` reorders
the keyboard's path, every form can be sent from the keyboard, one ``h1`` and no skipped heading
level (the outline a screen reader and a page without CSS show), tables with headers, pictures with
words. Every template is rendered at least once: a new page cannot escape these checks."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser

import httpx

from rempart.admin_api.console.web import TEMPLATES
from rempart.common import keys

from .conftest import ADMIN, ADMIN_PASSWORD, Harness
from .console_support import LOGIN_CODE, Browser, TotpAuthService, auth_server, browsers, new_browser
from .test_console import console_paths

__all__ = ["auth_server", "browsers"]  # fixtures used by name

GOOD_PASSWORD = "Corr3ct-Horse-Battery!"
IVY = "ivy@example.org"
NOT_FIELDS = frozenset({"hidden", "submit", "button", "reset", "image"})
FOCUSABLE = frozenset({"a", "button", "input", "select", "textarea", "summary"})


@dataclass
class Label:
    target: str | None
    words: list[str] = field(default_factory=list)


class Audit(HTMLParser):
    """What a page offers the keyboard and assistive technologies."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fields: list[tuple[str, str, bool]] = []  # (tag, id, inside its label)
        self.labels: dict[str, str] = {}  # for -> the label's words
        self.wrapped_words: list[str] = []  # the words of labels wrapping a field
        self.ids: Counter[str] = Counter()
        self.focus_order: list[tuple[str, dict[str, str | None]]] = []
        self.tabindexes: list[tuple[str, int]] = []
        self.headings: list[int] = []
        self.forms: list[bool] = []  # per form: can it be sent (a submit control)?
        self.tables: list[bool] = []  # per table: caption or header cells?
        self.pictures: list[str] = []  # svg/img without words
        self.lang = ""
        self._open_labels: list[Label] = []
        self._in_form = False
        self._svg_titled: list[bool] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids[str(a["id"])] += 1
        if tag == "html":
            self.lang = a.get("lang") or ""
        if a.get("tabindex") is not None:
            self.tabindexes.append((tag, int(str(a["tabindex"]))))
        if tag == "label":
            self._open_labels.append(Label(a.get("for")))
        kind = (a.get("type") or "text").lower() if tag == "input" else tag
        if tag in ("input", "select", "textarea") and kind not in NOT_FIELDS:
            self.fields.append((tag, a.get("id") or "", bool(self._open_labels)))
        if tag in FOCUSABLE and kind != "hidden" and (tag != "a" or a.get("href")):
            self.focus_order.append((tag, a))
        if len(tag) == 2 and tag[0] == "h" and tag[1].isdigit():
            self.headings.append(int(tag[1]))
        if tag == "form":
            self._in_form = True
            self.forms.append(False)
        if self._in_form and ((tag == "button" and (a.get("type") or "submit") == "submit")
                              or (tag == "input" and kind in ("submit", "image"))):
            self.forms[-1] = True
        if tag == "table":
            self.tables.append(False)
        if tag in ("caption", "th") and self.tables:
            self.tables[-1] = True
        if tag == "svg":
            self._svg_titled.append(a.get("role") == "img" and bool(a.get("aria-labelledby") or a.get("aria-label")))
        if tag == "title" and self._svg_titled:
            self._svg_titled[-1] = True  # an SVG's accessible name
        if tag == "img" and not a.get("alt"):
            self.pictures.append(str(a.get("src")))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("input", "img", "br", "hr", "meta", "link"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "label" and self._open_labels:
            label = self._open_labels.pop()
            words = " ".join("".join(label.words).split())
            if label.target:
                self.labels[label.target] = words
            else:
                self.wrapped_words.append(words)
        if tag == "form":
            self._in_form = False
        if tag == "svg" and self._svg_titled:
            if not self._svg_titled.pop():
                self.pictures.append("svg")

    def handle_data(self, data: str) -> None:
        for label in self._open_labels:
            label.words.append(data)


def audit(path: str, reply: httpx.Response) -> Audit:
    assert reply.status_code < 500 and reply.headers["content-type"].startswith("text/html"), (path, reply.status_code)
    page = Audit()
    page.feed(reply.text)
    page.close()
    where = f"{path}: "
    assert page.lang == "en", where + "no language on <html>"
    for tag, ident, wrapped in page.fields:
        if wrapped:
            continue
        assert ident, where + f"a <{tag}> without an id or a label around it"
        assert page.labels.get(ident), where + f"<{tag} id={ident}> has no label with words"
    assert all(page.wrapped_words), where + "a label without words"
    duplicates = [ident for ident, n in page.ids.items() if n > 1]
    assert not duplicates, where + f"ids used twice: {duplicates}"
    # The keyboard's path: the skip link first, to <main>, in document order (no positive tabindex).
    first_tag, first = page.focus_order[0]
    assert first_tag == "a" and first.get("href") == "#main" and "skip" in str(first.get("class")), where + str(first)
    assert page.ids["main"] == 1 and 'id="main"' in reply.text.split("<main", 1)[1].split(">", 1)[0], where
    assert all(n <= 0 for _, n in page.tabindexes), where + f"a positive tabindex: {page.tabindexes}"
    assert all(tag == "main" for tag, n in page.tabindexes if n < 0), where + str(page.tabindexes)
    assert all(page.forms), where + "a form with no submit button (not sendable from the keyboard)"
    # The outline: one h1, and no level skipped on the way down.
    assert page.headings.count(1) == 1 and page.headings[0] == 1, where + f"headings {page.headings}"
    for before, after in zip(page.headings, page.headings[1:], strict=False):
        assert after <= before + 1, where + f"heading h{before} then h{after}"
    assert all(page.tables), where + "a table without a caption or header cells"
    assert not page.pictures, where + f"pictures without words: {page.pictures}"
    return page


@dataclass
class Tour:
    """Pages visited, by route and by template, to show that none was left out."""

    routes: set[str] = field(default_factory=set)
    templates: set[str] = field(default_factory=set)

    async def get(self, browser: Browser, route: str, template: str, path: str | None = None) -> Audit:
        reply = await browser.get(path or route)
        self.routes.add(route)
        self.templates.add(template)
        return audit(path or route, reply)

    async def post(self, browser: Browser, path: str, template: str, data: dict[str, str] | None = None) -> Audit:
        reply = await browser.post(path, data)
        self.templates.add(template)
        return audit(path, reply)


async def test_every_console_page_is_labelled_keyboard_reachable_and_outlined(
    harness: Harness, browsers: list[Browser]
) -> None:
    auth = harness.auth
    assert isinstance(auth, TotpAuthService)
    await harness.add_account(IVY, GOOD_PASSWORD)
    await harness.backend.directory.add_alias("sales@example.org", [IVY])
    now = time.time()
    block = {"reason": "R-IPS-2 connection rate", "blocked_at": now, "expires_at": now + 600,
             "client_ip": "192.0.2.9", "protocol": "smtp"}
    await harness.backend.redis.set(keys.ips_block("192.0.2.9"), json.dumps(block), ex=600)
    await harness.backend.redis.zadd(keys.IPS_BLOCKS, {"192.0.2.9": now + 600})
    tour = Tour()

    visitor = new_browser(harness, browsers)
    await tour.get(visitor, "/login", "login.html")

    # A user: self-service, with the pages that answer a POST (secrets shown once).
    ivy = new_browser(harness, browsers)
    await ivy.login(IVY, GOOD_PASSWORD)
    for route, template in (("/account", "account.html"), ("/account/password", "password.html"),
                            ("/account/2fa", "twofactor.html"), ("/account/app-passwords", "app_passwords.html"),
                            ("/account/logins", "logins.html")):
        await tour.get(ivy, route, template)
    await tour.post(ivy, "/account/2fa/enrol", "twofactor_enrol.html")
    await tour.post(ivy, "/account/2fa/confirm", "recovery_codes.html", {"code": "123456"})
    await tour.post(ivy, "/account/app-passwords", "app_password_created.html", {"name": "phone"})
    assert (await ivy.post("/logout")).status_code == 303
    await ivy.get("/login")
    reply = await ivy.post("/login", {"email": IVY, "password": GOOD_PASSWORD})
    assert 'action="/login/code"' in reply.text  # TOTP is on now: the code step
    tour.templates.add("login_code.html")
    audit("/login (code step)", reply)
    assert (await ivy.post("/login/code", {"code": LOGIN_CODE})).status_code == 303

    # An administrator: every admin page, each with something in it.
    admin = new_browser(harness, browsers)
    await admin.login(ADMIN, ADMIN_PASSWORD)
    for route, template, path in (
        ("/admin/domains", "domains.html", None),
        ("/admin/domains/{domain}", "domain.html", "/admin/domains/example.org"),
        ("/admin/accounts/{address}", "account_admin.html", f"/admin/accounts/{IVY}"),
        ("/admin/aliases/{alias}", "alias.html", "/admin/aliases/sales@example.org"),
        ("/admin/domains/{domain}/settings", "overrides.html", "/admin/domains/example.org/settings"),
        ("/admin/accounts/{address}/settings", "overrides.html", f"/admin/accounts/{IVY}/settings"),
        ("/admin/blocks", "blocks.html", "/admin/blocks?ip=192.0.2.9"),
        ("/admin/events", "events.html", None),
        ("/admin/settings", "settings.html", None),
        ("/admin/status", "status.html", None),
    ):
        page = await tour.get(admin, route, template, path)
        assert page.fields or route in ("/admin/events", "/admin/status"), route
    await tour.get(admin, "/admin/domains/{domain}", "error.html", "/admin/domains/nowhere.example")  # a 404 page
    settings = await admin.get("/admin/settings")
    assert settings.text.count("<form") >= 9  # one form per group, each sent on its own

    pages = {route for route in console_paths("GET")} - {"/", "/admin"}  # those two only redirect
    assert pages <= tour.routes, pages - tour.routes
    templates = {path.name for path in TEMPLATES.glob("*.html")} - {"base.html", "_macros.html"}
    assert templates == tour.templates, templates ^ tour.templates
