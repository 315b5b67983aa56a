"""The dashboards and alerts against a real Prometheus (issue 13, R-OPS-4): Debian's ``prometheus``
scrapes the suite as processes (the e2e Stack, relay included, tracing to an in-process OTLP
receiver) every second, with the chart's rendered PrometheusRule loaded as its rule file; mail
flows (accepted, refused, relay denied, logins right and wrong, a lockout, an IP block); then
EVERY PromQL expression of the chart's dashboards and rules, parsed out of the rendered
manifests, is evaluated through Prometheus' HTTP API: each one must parse, and each one about
traffic this test made must return data. ``promtool check rules`` passes on the rendered rules,
and Prometheus stores the edge's and imap-pop's exemplars with trace ids the receiver got.

Skipped, with the reason, where ``prometheus`` is not installed (.ci/run installs it).
"""

from __future__ import annotations

import imaplib
import json
import poplib
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo, strong_password
from rempart.common.testing.localstack import free_port, stop_process, wait_for_port
from rempart.common.testing.polling import wait_until
from rempart.common.testing.traces import OtlpReceiver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_chart_processes import CHART, render  # the chart harness's helm rendering

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NAMESPACE = "mail"  # the release namespace the chart's rules are rendered for
pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed "
                       "(apt-get install prometheus; .ci/run installs it)"),
]
# Grafana's macros and variables, as Grafana would send them for this Prometheus.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "${datasource}": "", "$namespace": ".*"}
# What this test cannot make happen, so that an expression naming it may come back empty; every
# other expression must return data.
NOT_DRIVEN = {
    "rempart_relay_recipients_total": "no mail to another domain is relayed (the relay has no MX to reach here)",
    "rempart_policy_dns_queries_total": "the DNS checks (DNSBL, SPF, rDNS) are off in the default settings",
    "rempart_grpc_client_failures_total": "no gRPC peer fails while the suite runs",
}
SERVICES = ("policy", "auth", "smtp-edge", "imap-pop", "admin-api", "relay")
# Another sender on the Internet: a loopback address that is not 127.0.0.1, which the default
# settings trust (relay.trusted_hosts), so intrusion prevention counts and blocks it.
STRANGER = ("127.0.0.66", 0)
GUESSER = ("127.0.0.67", 0)  # guesses a password


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=15) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400 bad_data: the body says why
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return dict(self.api("query", query=expr, time=f"{time.time():.3f}"))


@dataclass
class Observed:
    stack: Stack
    prometheus: Prometheus
    receiver: OtlpReceiver
    rules_file: Path
    expressions: list[tuple[str, str]]  # (where, PromQL as Prometheus gets it)


def chart_expressions(workdir: Path) -> tuple[Path, list[tuple[str, str]]]:
    """Every PromQL expression in the chart: the rendered PrometheusRule's rules (written out as
    a Prometheus rule file) and every target of every dashboard ConfigMap."""
    objects = render("-f", str(CHART / "ci" / "observability-values.yaml"))
    expressions: list[tuple[str, str]] = []
    rule_objects = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert rule_objects, "ci/observability-values.yaml renders no PrometheusRule"
    groups = [g for o in rule_objects for g in o["spec"]["groups"]]
    rules_file = workdir / "rempart-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    for group in groups:
        for rule in group["rules"]:
            expressions.append((f"rule {rule.get('alert') or rule.get('record')}", rule["expr"].strip()))
    boards = 0
    for obj in objects:
        if obj["kind"] != "ConfigMap" or "grafana_dashboard" not in (obj["metadata"].get("labels") or {}):
            continue
        for key, text in obj["data"].items():
            boards += 1
            for panel in json.loads(text)["panels"]:
                for target in panel.get("targets", []):
                    expr = target["expr"]
                    for macro, value in GRAFANA_SUBSTITUTIONS.items():
                        expr = expr.replace(macro, value)
                    expressions.append((f"{key}: {panel['title']}", expr))
    assert boards >= 3, f"{boards} dashboards rendered"
    return rules_file, expressions


def start_prometheus(workdir: Path, stack: Stack, rules_file: Path) -> Prometheus:
    """Prometheus on a free port, its own config and data in ``workdir``: every service's ops
    port, scraped each second, labelled as the ServiceMonitor's relabelling would (job
    <release>-<component>-ops, namespace), the chart's rules loaded, exemplars stored."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {"job_name": f"rempart-{name}-ops",
             "static_configs": [{"targets": [f"127.0.0.1:{stack.ports[name + '.ops']}"],
                                 "labels": {"namespace": NAMESPACE, "component": name}}]}
            for name in SERVICES
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    assert PROMETHEUS is not None
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage",
             "--storage.tsdb.retention.time=1h"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_for_port("127.0.0.1", port, proc=proc)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=30, what="Prometheus ready")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return prometheus


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("prometheus-e2e")
    rules_file, expressions = chart_expressions(workdir)
    receiver = OtlpReceiver().start()
    stack = Stack(workdir=workdir / "stack", relay=True, extra_env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"})
    prometheus: Prometheus | None = None
    try:
        stack.start()
        prometheus = start_prometheus(workdir, stack, rules_file)
        yield Observed(stack, prometheus, receiver, rules_file, expressions)
    finally:
        if prometheus is not None:
            stop_process(prometheus.proc)
        stack.stop()
        receiver.stop()


# Traffic ---------------------------------------------------------------------------------------
def tls_context(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=stack.cert_file)


def no_failure_delay(stack: Stack, admin: AdminApi) -> None:
    """A wrong password is answered at once rather than after login.failure_delay_ms (1 s by
    default): what this test counts is the same, sooner. This module's stack is its own."""
    status, body = admin.call("PATCH", "/v1/settings", {"login": {"failure_delay_ms": 0}})
    assert status == 200 and isinstance(body, dict), (status, body)
    version = int(body["version"])

    def applied(name: str) -> bool:
        log = (stack.workdir / f"{name}.log").read_text(errors="replace")
        return max(map(int, re.findall(r"settings reloaded settings_version=(\d+)", log)), default=-1) >= version

    wait_until(lambda: all(applied(name) for name in ("auth", "smtp-edge", "imap-pop")), timeout=10,
               what=f"settings version {version} in auth and the edges", every=0.05)


def make_traffic(stack: Stack) -> dict[str, int]:
    """Mail and logins of every kind the dashboards count; the replies seen, by kind."""
    demo = bootstrap_demo(stack)
    user, peer = demo["user"], demo["peer"]
    admin = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
    admin.login(stack.admin_email, stack.admin_password)
    no_failure_delay(stack, admin)
    victim, victim_password = "victim@example.test", strong_password()
    admin.create_account("example.test", victim, victim_password)
    seen = {"accepted": 0, "refused": 0, "relay_denied": 0, "failed_logins": 0, "4xx": 0, "imap": 0, "pop3": 0}

    # Accepted: submission with AUTH, and the MX from another domain.
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30) as client:
        client.starttls(context=tls_context(stack))
        client.login(user, demo["user_password"])
        for number in range(3):
            client.sendmail(user, [peer], f"From: {user}\r\nTo: {peer}\r\nSubject: metrics {number}\r\n\r\n"
                            f"{uuid.uuid4().hex}\r\n".encode())
            seen["accepted"] += 1
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.smtp"], timeout=30, source_address=STRANGER) as client:
        client.ehlo("sender.example.org")
        # The null sender (a bounce): no DNS here to show that a sender's domain exists.
        code, reply = client.mail("")
        assert code == 250, reply
        code, reply = client.rcpt(peer)
        assert code == 250, reply
        code, _ = client.data(f"From: MAILER-DAEMON@sender.example.org\r\nTo: {peer}\r\nSubject: from afar\r\n\r\nhi\r\n")
        assert code == 250
        seen["accepted"] += 1
        # Refused: relaying for a stranger.
        client.mail("")
        code, reply = client.rcpt("anyone@elsewhere.example.net")
        assert code >= 500, reply
        seen["relay_denied"] += 1
        client.rset()

    # IMAP and POP3: the right password, then a wrong one (each edge counts its logins).
    ctx = tls_context(stack)
    imap = imaplib.IMAP4_SSL("localhost", stack.ports["imap-pop.imaps"], ssl_context=ctx, timeout=30)
    imap.login(peer, demo["peer_password"])
    wait_until(lambda: imap.select("INBOX")[1][0] not in (b"0", b""), timeout=20, what="mail in the INBOX")
    status, _ = imap.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK"
    imap.logout()
    seen["imap"] += 1
    pop = poplib.POP3_SSL("localhost", stack.ports["imap-pop.pop3s"], context=ctx, timeout=30)
    pop.user(peer)
    pop.pass_(demo["peer_password"])
    assert pop.stat()[0] >= 1
    pop.quit()
    seen["pop3"] += 1
    imap = imaplib.IMAP4_SSL("localhost", stack.ports["imap-pop.imaps"], ssl_context=ctx, timeout=30)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login(peer, "not-the-password")
    seen["failed_logins"] += 1
    imap.shutdown()

    # A lockout (R-LOG-1: 5 failures in 10 minutes), three sessions of 3 wrong AUTHs, each ended
    # by the session's budget with a 421 (the 4xx of the dashboards); the last ones find it locked.
    # From a guesser's address: this machine's 127.0.0.1 is a known IP (R-LOG-1 known_ip_bypass).
    for _ in range(3):
        with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30,
                          source_address=GUESSER) as client:
            client.starttls(context=tls_context(stack))
            client.ehlo()
            for _ in range(3):
                # A new guess each time: the same wrong password again counts once (R-LOG-1).
                client.user, client.password = victim, "wrong-" + strong_password()
                try:
                    client.auth("PLAIN", client.auth_plain)  # one AUTH command per attempt
                    raise AssertionError("a wrong password was accepted")
                except smtplib.SMTPAuthenticationError as exc:
                    seen["failed_logins"] += 1
                    if exc.smtp_code == 421:  # the session's budget (3): closed
                        seen["4xx"] += 1
                        break
                    assert exc.smtp_code == 535, exc

    # An IP block (R-IPS-5: 3 unknown recipients): last, since it blocks this machine's address.
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.smtp"], timeout=30, source_address=STRANGER) as client:
        client.ehlo("sender.example.org")
        client.mail("")
        for number in range(4):
            try:
                code, _ = client.rcpt(f"nobody{number}@example.test")
            except smtplib.SMTPServerDisconnected:
                break
            if code >= 500:
                seen["refused"] += 1
            elif code >= 400:
                seen["4xx"] += 1
                break
    return seen


# The tests -------------------------------------------------------------------------------------
def test_r_ops_4_promtool_checks_the_rendered_rules(observed: Observed) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it)")
    result = subprocess.run([PROMTOOL, "check", "rules", str(observed.rules_file)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout + result.stderr), result.stdout


def lhs_of_comparison(expr: str) -> str:
    """An alert's expression without its threshold (``x > 5`` -> ``x``): what must have data."""
    match = re.fullmatch(r"(.*\S)\s*(?:>|<|==|!=|>=|<=)\s*-?[0-9.]+(?:e[+-]?\d+)?\s*", expr, re.S)
    return match.group(1) if match else expr


def test_r_ops_4_every_dashboard_and_rule_expression_parses_and_traffic_ones_return_data(
        observed: Observed) -> None:
    stack, prometheus = observed.stack, observed.prometheus
    seen = make_traffic(stack)
    print(f"\ntraffic: {seen}")
    assert seen["accepted"] == 4 and seen["relay_denied"] == 1 and seen["refused"] >= 1
    assert seen["failed_logins"] >= 6 and seen["4xx"] >= 1

    # Every target scraped, and the rules loaded by Prometheus itself.
    def targets_up() -> list[dict[str, Any]]:
        up = [t for t in prometheus.api("targets")["data"]["activeTargets"] if t["health"] == "up"]
        return up if len(up) == len(SERVICES) else []

    targets = wait_until(targets_up, timeout=30, what="every service's /metrics scraped")
    assert {t["labels"]["component"] for t in targets} == set(SERVICES)
    rules = prometheus.api("rules")["data"]["groups"]
    bad_rules = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r.get("health") == "err"]
    assert rules and not bad_rules, bad_rules

    # Rates need two samples after the traffic: wait until the last traffic counter is in a rate.
    wait_until(lambda: prometheus.query(
        'sum(increase(rempart_ips_blocks_total[1m]))')["data"]["result"], timeout=60,
        what="the IP block in a scraped increase()")

    unparsed, empty, with_data, excused = [], [], [], []
    parsed: list[tuple[str, str, str | None]] = []  # where, probe, why it may be empty
    for where, expr in observed.expressions:
        answer = prometheus.query(expr)
        if answer.get("status") != "success":
            unparsed.append(f"{where}: {answer.get('errorType')}: {answer.get('error')}\n    {expr}")
            continue
        probe = lhs_of_comparison(expr) if where.startswith("rule ") else expr
        parsed.append((where, probe, next((why for metric, why in NOT_DRIVEN.items() if metric in expr), None)))
    # What must return data and does not yet (a counter not yet in two scrapes since the traffic,
    # a recording rule not yet evaluated since) is asked again, each second, for up to 15 s.
    driven = [(where, probe) for where, probe, reason in parsed if reason is None]
    deadline = time.monotonic() + 15
    while True:
        waiting = []
        for where, probe in driven:
            if prometheus.query(probe)["data"]["result"]:
                with_data.append(where)
            else:
                waiting.append((where, probe))
        driven = waiting
        if not driven or time.monotonic() > deadline:
            break
        time.sleep(1)
    empty = [f"{where}: no data\n    {probe}" for where, probe in driven]
    for where, probe, reason in parsed:
        if reason is not None:
            if prometheus.query(probe)["data"]["result"]:
                with_data.append(where)
            else:
                excused.append(f"{where}: {reason}")
    print(f"{len(observed.expressions)} expressions: {len(with_data)} with data, "
          f"{len(excused)} empty as expected, {len(unparsed)} not parsed, {len(empty)} empty")
    for line in excused:
        print(f"  empty, as expected: {line}")
    assert not unparsed, "\n".join(unparsed)
    assert not empty, "\n".join(empty)
    assert len(with_data) >= len(observed.expressions) - len(NOT_DRIVEN) - 2


def test_r_ops_4_prometheus_stores_exemplars_with_the_trace_ids_of_the_spans(observed: Observed) -> None:
    """Scraped as OpenMetrics, the latencies (SMTP stages, IMAP commands, the durable store, the
    policy calls on both sides, the password hash) carry trace ids the OTLP receiver got from the
    same services."""
    prometheus, receiver = observed.prometheus, observed.receiver
    if not [s for s in receiver.spans() if s.name.startswith("IMAP ")]:
        make_traffic_light(observed.stack)
    for series in ("rempart_smtp_stage_seconds_bucket", "rempart_imap_command_seconds_bucket",
                   "rempart_smtp_store_seconds_bucket", "rempart_smtp_policy_seconds_bucket",
                   "rempart_policy_check_seconds_bucket", "rempart_auth_hash_seconds_bucket"):
        def stored(series: str = series) -> list[str]:
            answer = prometheus.api("query_exemplars", query=series, start=f"{time.time() - 600:.0f}",
                                    end=f"{time.time() + 5:.0f}")
            return [e["labels"]["trace_id"] for s in answer.get("data") or [] for e in s["exemplars"]
                    if "trace_id" in e["labels"]]

        trace_ids = wait_until(stored, timeout=30, what=f"exemplars of {series}")
        received = {s.trace_id for s in receiver.spans()}
        matching = [t for t in trace_ids if t in received]
        print(f"{series}: {len(trace_ids)} exemplars, {len(matching)} with a trace the receiver has")
        assert matching, f"{series}: exemplar trace ids {trace_ids[:5]} are none of the received traces"


def make_traffic_light(stack: Stack) -> None:
    """A login and a SELECT on IMAP (when this test runs alone)."""
    demo = bootstrap_demo(stack, domain="exemplars.test")
    imap = imaplib.IMAP4_SSL("localhost", stack.ports["imap-pop.imaps"], ssl_context=tls_context(stack), timeout=30)
    imap.login(demo["user"], demo["user_password"])
    imap.select("INBOX")
    imap.logout()
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp-edge.submission"], timeout=30) as client:
        client.starttls(context=tls_context(stack))
        client.login(demo["user"], demo["user_password"])
