"""The web console in a real browser (issue 14): Debian's chromium, headless, driven by Selenium
through Debian's chromedriver, against the suite as processes (the ``stack`` fixture: the admin
API serving the console, the auth service, the IMAP/POP3 service, the SMTP edge, policy).

A new user signs in, changes the password (the page's own script ticks the policy's rules as one
types, so it runs under the Content-Security-Policy), enrols TOTP by reading the secret from the
page and computing the code with pyotp, signs out, signs in again with a code, creates an app
password, and uses it: a message submitted over SMTP with it is read over IMAP with it, while the
account's own password is refused over IMAP now that 2FA is on (R-2FA-2). An administrator signs
in with its code, creates a domain and a user (who can then read mail over IMAP), unlocks an
account that wrong passwords over IMAP locked (R-LOG-1), and lifts the block that too many
connections put on an IP (R-IPS-2).

Every page visited is saved as a PNG under tests/e2e/screenshots/console/ (ignored by git) for a
reviewer to look at. Skipped, with the reason, where chromium or chromedriver is not installed
(.ci/run installs both on Debian: apt-get install chromium chromium-driver). The driver's path is
given explicitly, so Selenium Manager never downloads anything.
"""

from __future__ import annotations

import imaplib
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from rempart.common.testing.devstack import AdminApi, Stack, strong_password
from rempart.common.testing.polling import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mail_clients import (
    IMAP_LOGIN_FAILED,
    MAX_FAILURES,
    Account,
    BoundIMAP,
    fresh_account,
    imaps,
    intrusion_text,
    read_folder,
    send,
    tls_context,
    unblock,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or not Path(CHROMEDRIVER).is_file(),
    reason="chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)",
)
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots" / "console"
WAIT_SECONDS = 15.0
# Client IPs of their own (intrusion prevention counts per IP across the session's stack; see
# test_auth_e2e's docstring for the ones other tests use).
LOCKOUT_IP = "127.0.0.80"
FLOODING_IP = "127.0.0.81"
REFUSED_IP = "127.0.0.82"
CONNECTIONS_PER_MINUTE = 5  # SPEC R-IPS-2 default: more than this in a minute blocks the IP


class Console:
    """The browser on the console: open pages, fill and send forms, read what a person reads,
    and a screenshot of every page it shows."""

    def __init__(self, driver: webdriver.Chrome, base: str, prefix: str) -> None:
        self.driver = driver
        self.base = base
        self.prefix = prefix
        self.shots = 0

    def path(self) -> str:
        return str(self.driver.current_url).removeprefix(self.base)

    def find(self, css: str) -> WebElement:
        try:
            found: WebElement = WebDriverWait(self.driver, WAIT_SECONDS).until(
                expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))
        except TimeoutException:
            raise AssertionError(f"no {css} on {self.path()}") from None
        return found

    def text(self, css: str) -> str:
        return str(self.find(css).text)

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def open(self, path: str, shot: str) -> None:
        self.driver.get(self.base + path)
        self.find("main h1")
        self.shot(shot)

    def submit(self, css: str, shot: str) -> None:
        """Click a form's button and wait for the page that answers it."""
        page = self.find("html")
        self.find(css).click()
        # While the old page goes, Chromium may answer the staleness probe with an inspector
        # error ("Node with given id does not belong to the document") instead of "stale":
        # asked again, it says stale.
        WebDriverWait(self.driver, WAIT_SECONDS, ignored_exceptions=(WebDriverException,)).until(
            expected_conditions.staleness_of(page))
        self.find("main h1")
        self.shot(shot)

    def at(self, expected: str) -> None:
        try:
            WebDriverWait(self.driver, WAIT_SECONDS).until(lambda _: self.path() == expected)
        except TimeoutException:
            raise AssertionError(f"at {self.path()}, expected {expected}") from None

    def shot(self, name: str) -> None:
        self.shots += 1
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(SCREENSHOTS / f"{self.prefix}-{self.shots:02d}-{name}.png"))

    def sign_in(self, email: str, password: str, code: str | None = None) -> None:
        self.open("/login", "login")
        self.type("#email", email)
        self.type("#password", password)
        if code is None:
            self.submit("form[action='/login'] button", "signed-in")
        else:
            self.submit("form[action='/login'] button", "login-code")
            self.type("#code", code)
            self.submit("form[action='/login/code'] button", "signed-in")
        self.at("/account")

    def sign_out(self) -> None:
        self.submit("form.signout button", "signed-out")
        self.at("/login?notice=logged_out")


@pytest.fixture
def chromium() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--window-size=1100,1000", "--disable-extensions", "--password-store=basic"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_url(stack: Stack) -> str:
    # localhost: a secure context for the browser, so the console's Secure __Host- cookies are
    # kept over the stack's plain http, as they would be over https.
    return f"http://localhost:{stack.ports['admin-api.http']}"


def imap_login_reply(stack: Stack, account: Account) -> str:
    with BoundIMAP(stack, REFUSED_IP) as client:
        client.starttls(ssl_context=tls_context(stack))
        reply = client.login_reply(account.address, account.password)
        client.logout()
    return reply


def test_r_2fa_2_a_new_user_enrols_totp_in_the_browser_and_reads_mail_with_an_app_password(
    stack: Stack, demo: dict[str, str], admin: AdminApi, chromium: webdriver.Chrome
) -> None:
    user = fresh_account(admin, "console")
    new_password = strong_password()
    browser = Console(chromium, console_url(stack), "user")
    browser.open("/", "login")
    browser.at("/login")
    browser.sign_in(user.address, user.password)
    assert browser.text("#address") == user.address
    assert browser.text("#totp-state") == "off"

    # R-PWD-3, with the policy's rules ticked by the page's script while one types.
    browser.open("/account/password", "password")
    browser.type("#old_password", user.password)
    browser.type("#new_password", "short")
    assert browser.find("li[data-check='length']").get_attribute("data-state") == "unmet"
    browser.type("#new_password", new_password)
    assert browser.find("li[data-check='length']").get_attribute("data-state") == "met"
    browser.type("#confirm", new_password)
    assert browser.find("li[data-check='confirm']").get_attribute("data-state") == "met"
    browser.shot("password-typed")
    browser.submit("#password-form button", "password-changed")
    browser.at("/account?notice=password_changed")
    user = Account(user.address, new_password)
    with imaps(stack, user) as client:  # before 2FA, the account's password is the IMAP password
        assert read_folder(client) == []

    # R-2FA-1: the secret is read from the page, the code computed as a phone would.
    browser.open("/account/2fa", "two-step")
    browser.submit("form[action='/account/2fa/enrol'] button", "totp-enrol")
    secret = browser.text("#totp-secret")
    browser.find("figure.qr svg")
    totp = pyotp.TOTP(secret)
    browser.type("#code", totp.now())
    browser.submit("form[action='/account/2fa/confirm'] button", "recovery-codes")
    assert len(browser.text("#recovery-codes").split()) >= 8

    browser.sign_out()
    browser.open("/account", "signed-out-account")
    browser.at("/login")  # signed out means signed out
    # The confirming code's time step is spent (RFC 6238 section 5.2): sign in with the next one.
    browser.sign_in(user.address, user.password, totp.at(time.time() + 30))
    assert browser.text("#totp-state").startswith("on")

    # R-2FA-2: an app password, shown once with what to paste into a mail program.
    browser.open("/account/app-passwords", "app-passwords")
    browser.type("#name", "laptop")
    browser.submit("form[action='/account/app-passwords'] button", "app-password-created")
    app_password = browser.text("#app-password")
    assert user.address in browser.text("main")
    browser.open("/account/app-passwords", "app-passwords-listed")
    assert "laptop" in browser.text("main") and app_password not in browser.text("main")

    # The app password is the account's password for mail programs now; its own is refused.
    with_app_password = Account(user.address, app_password)
    subject = f"Sent with an app password {uuid.uuid4().hex[:8]}"
    send(stack, with_app_password, [subject])
    with imaps(stack, with_app_password) as client:
        wait_until(lambda: subject in {m.subject for m in read_folder(client)}, timeout=30,
                   what="the message in the INBOX over IMAP")
    assert imap_login_reply(stack, user) == IMAP_LOGIN_FAILED


def test_r_adm_4_an_admin_creates_a_domain_and_a_user_unlocks_an_account_and_lifts_a_block(
    stack: Stack, demo: dict[str, str], admin: AdminApi, chromium: webdriver.Chrome
) -> None:
    locked = fresh_account(admin, "console-locked")
    try:
        # R-LOG-1: wrong passwords over IMAP lock the account; then its right password is refused too.
        with BoundIMAP(stack, LOCKOUT_IP) as client:
            client.starttls(ssl_context=tls_context(stack))
            for n in range(MAX_FAILURES):
                assert client.login_reply(locked.address, f"wrong-{n}-{uuid.uuid4().hex}") == IMAP_LOGIN_FAILED
            assert client.login_reply(locked.address, locked.password) == IMAP_LOGIN_FAILED
            client.logout()
        # R-IPS-2: too many connections in a minute block an IP; the next is refused at connect.
        seen: list[str] = []
        for _ in range(2 * CONNECTIONS_PER_MINUTE):
            try:
                with BoundIMAP(stack, FLOODING_IP) as client:
                    client.logout()
                seen.append("greeted")
            except imaplib.IMAP4.error as exc:
                seen.append(str(exc))
                break
        assert seen[:CONNECTIONS_PER_MINUTE] == ["greeted"] * CONNECTIONS_PER_MINUTE, seen
        assert intrusion_text(FLOODING_IP) in seen[-1], seen

        browser = Console(chromium, console_url(stack), "admin")
        browser.sign_in(stack.admin_email, stack.admin_password, admin.totp_code(stack.admin_email))

        domain = f"console-admin-{uuid.uuid4().hex[:8]}.test"
        browser.open("/admin/domains", "domains")
        browser.type("#name", domain)
        browser.type("#description", "Made in the browser")
        browser.submit("form[action='/admin/domains'] button", "domain-created")
        browser.at(f"/admin/domains/{domain}?notice=domain_created")
        made = Account(f"quentin@{domain}", strong_password())
        browser.type("#address", "quentin")
        browser.type("#display_name", "Quentin <b>Made</b>")
        browser.type("#new-password", made.password)
        browser.submit(f"form[action='/admin/domains/{domain}/accounts'] button", "account-created")
        browser.at(f"/admin/accounts/{made.address}?notice=account_created")
        assert browser.text("#display-name") == "Quentin <b>Made</b>"  # text, never markup
        with imaps(stack, made) as client:
            assert read_folder(client) == []

        browser.open(f"/admin/accounts/{locked.address}", "locked-account")
        browser.submit(f"form[action='/admin/accounts/{locked.address}/unlock'] button", "unlocked")
        browser.at(f"/admin/accounts/{locked.address}?notice=unlocked")
        assert "now unlocked" in browser.text(".notice")
        with imaps(stack, locked) as client:
            assert read_folder(client) == []

        browser.open(f"/admin/blocks?ip={FLOODING_IP}", "block-lookup")
        assert FLOODING_IP in browser.text("main")
        browser.submit(f"form[action='/admin/blocks/unblock'] input[value='{FLOODING_IP}'] ~ button", "unblocked")
        browser.at("/admin/blocks?notice=unblocked")
        assert FLOODING_IP not in browser.text("main")
        status, body = admin.call("GET", f"/v1/ips/blocks/{FLOODING_IP}")
        assert status == 404, body

        for name, path in (("settings", "/admin/settings"), ("events", "/admin/events"),
                           ("status", "/admin/status"), ("logins", "/account/logins"),
                           ("domain-overrides", f"/admin/domains/{domain}/settings"),
                           ("account-overrides", f"/admin/accounts/{made.address}/settings")):
            browser.open(path, name)
    finally:
        unblock(admin, [LOCKOUT_IP, FLOODING_IP])



def focused(driver: webdriver.Chrome) -> str:
    """The element the keyboard is on, as 'tag#id' or 'tag[href]' or 'tag:text'."""
    described = driver.execute_script(
        "var e = document.activeElement;"
        "return e.tagName.toLowerCase() + (e.id ? '#' + e.id : e.getAttribute('href') ? '[' + e.getAttribute('href') + ']'"
        " : ':' + (e.textContent || '').trim().slice(0, 40));")
    return str(described)


def test_a_user_works_the_console_from_the_keyboard_alone_and_reads_it_without_css(
    stack: Stack, demo: dict[str, str], admin: AdminApi, chromium: webdriver.Chrome
) -> None:
    """Issue 14's "keyboard-only use possible, readable without CSS": sign in and change the
    password with keys only; the first Tab reaches the skip link, which moves focus to the
    content; Tab walks every link, field and button of the page and comes back to the start (no
    trap); with every style sheet off the page still reads in order."""
    user = fresh_account(admin, "keyboard")
    browser = Console(chromium, console_url(stack), "keyboard")
    keys = ActionChains(chromium)
    browser.open("/login", "login")
    assert focused(chromium) == "input#email"  # the login form has the focus at once
    keys.send_keys(user.address, Keys.TAB, user.password, Keys.ENTER).perform()
    browser.at("/account")

    # From the top: the skip link first, and it takes the keyboard to the content.
    chromium.get(browser.base + "/account")
    browser.find("main h1")
    keys.send_keys(Keys.TAB).perform()
    assert focused(chromium) == "a[#main]"
    keys.send_keys(Keys.ENTER).perform()
    assert focused(chromium) == "main#main"

    # Tab visits everything that can be used, each once, then leaves the page's end: no trap.
    reachable = int(chromium.execute_script(
        "return Array.from(document.querySelectorAll('a[href], button, input:not([type=hidden]), select, textarea'))"
        ".filter(function (e) { return !e.disabled; }).length;"))
    chromium.get(browser.base + "/account")
    browser.find("main h1")
    seen: list[str] = []
    elements: list[str] = []
    for _ in range(reachable):
        keys.send_keys(Keys.TAB).perform()
        seen.append(focused(chromium))
        elements.append(str(chromium.switch_to.active_element.id))
    walk = seen
    assert len(set(elements)) == reachable and walk[0] == "a[#main]", seen
    after = []
    for _ in range(3):  # past the last one, the keyboard comes back round to the top: no trap
        keys.send_keys(Keys.TAB).perform()
        after.append(focused(chromium))
    assert "a[#main]" in after, after
    assert "a[/account/password]" in walk and "button:Sign out" in walk, walk

    # The password page, by keys only: follow the link, fill the form, send it.
    chromium.get(browser.base + "/account")
    browser.find("main h1")
    for _ in range(walk.index("a[/account/password]") + 1):
        keys.send_keys(Keys.TAB).perform()
    keys.send_keys(Keys.ENTER).perform()
    browser.at("/account/password")
    browser.shot("password")
    new_password = strong_password()
    keys.send_keys(Keys.TAB).perform()
    while focused(chromium) != "input#old_password":
        keys.send_keys(Keys.TAB).perform()
    keys.send_keys(user.password, Keys.TAB, new_password, Keys.TAB, new_password, Keys.ENTER).perform()
    browser.at("/account?notice=password_changed")
    browser.shot("password-changed")
    with imaps(stack, Account(user.address, new_password)) as client:
        assert read_folder(client) == []

    # Without CSS: the same words in the same order, the content after the navigation.
    chromium.execute_script("for (const sheet of document.styleSheets) { sheet.disabled = true; }")
    browser.shot("without-css")
    text = browser.text("body")
    assert text.index("Skip to the content") < text.index("My account") < text.index(user.address)
    assert browser.find("main h1").is_displayed()
