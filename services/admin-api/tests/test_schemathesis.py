"""The admin API against its own OpenAPI document, fuzzed by schemathesis (issue 12, R-ADM-2).

The live document (``GET /v1/openapi.json`` of the app the other tests use, over real Redis,
NATS JetStream and a real gRPC auth service) is loaded into schemathesis, which generates
requests for every operation: valid ones (half of them aimed at resources that exist, so that
the happy paths run too) and invalid ones. Each is sent as the superadmin, in the test's own
event loop, and every answer must:

- not be a server error (no 5xx: the harness's backing services are all up);
- have a status code, content type and body that the document declares for the operation;
- be RFC 9457 problem details (``application/problem+json``) when it is an error.

Generation is derandomized (the same requests on every run) and bounded per operation, so the
test takes well under 90 s on a shared 2-core machine. A failure lists each finding: the
operation, the request as a curl line, the status and what was wrong.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis.errors import HypothesisException
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure, FailureGroup

from .conftest import ADMIN, Harness

PROBLEM = "application/problem+json"
SECRET_FIELDS = ("password", "secret", "code", "hash", "token")
BASE_URL = "http://admin.test"
VALID_EXAMPLES = 6  # per operation, random path parameters
VALID_EXAMPLES_ON_KNOWN = 6  # per operation with path parameters, aimed at resources that exist
INVALID_EXAMPLES = 3  # negative cases cost about 5 times a valid one to generate
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

FUZZ_DOMAIN = "fuzz.example"
FUZZ_USER = f"user@{FUZZ_DOMAIN}"
FUZZ_USER_PASSWORD = "Fuzz-User-Pw-1234"
KNOWN_PATH_VALUES = {
    "domain": FUZZ_DOMAIN,
    "address": FUZZ_USER,
    "alias": f"sales@{FUZZ_DOMAIN}",
    "ip": "192.0.2.1",
    "name": "phone",
}

# Operations left out, each with why. Only what would end the test's own session or account:
# the fuzzer must keep its superadmin session to exercise everything else.
EXCLUDED = {
    "logout": "ends the superadmin session every later request uses",
}


@dataclass(frozen=True)
class Finding:
    operation: str
    request: str
    status: int
    problem: str

    def __str__(self) -> str:
        return f"{self.operation}: {self.status}: {self.problem}\n    {self.request}"


def generated(strategy: Any, examples: int) -> list[Case]:
    """``examples`` cases drawn from ``strategy``, the same ones on every run."""
    cases: list[Case] = []

    @hypothesis.settings(max_examples=examples, database=None, deadline=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis.given(strategy)
    def collect(case: Case) -> None:
        cases.append(case)

    try:
        collect()
    except HypothesisException:
        pass  # nothing to generate in this mode (an operation without parameters has no invalid form)
    return cases


def cases_for(operation: Any) -> list[Case]:
    names = {p.name for p in operation.path_parameters}
    cases = generated(operation.as_strategy(generation_mode=GenerationMode.POSITIVE), VALID_EXAMPLES)
    known = {name: KNOWN_PATH_VALUES[name] for name in names if name in KNOWN_PATH_VALUES}
    if known:
        cases += generated(operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=known),
                           VALID_EXAMPLES_ON_KNOWN)
    cases += generated(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE), INVALID_EXAMPLES)
    return cases


def httpx_arguments(case: Case, headers: dict[str, str]) -> dict[str, Any]:
    """The case as arguments of httpx's ``request`` (schemathesis gives them for requests)."""
    kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=headers)
    out: dict[str, Any] = {"method": kwargs["method"], "url": kwargs["url"], "headers": kwargs.get("headers") or {},
                           "params": kwargs.get("params") or None, "cookies": kwargs.get("cookies") or None}
    if "json" in kwargs:
        out["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        out["content" if isinstance(data, bytes | str) else "data"] = data
    return out


async def seed(harness: Harness) -> None:
    """Resources for the path parameters the fuzzer aims at (KNOWN_PATH_VALUES)."""
    await harness.add_account(FUZZ_USER, FUZZ_USER_PASSWORD)
    await harness.backend.directory.add_alias(KNOWN_PATH_VALUES["alias"], [FUZZ_USER])


async def test_r_adm_2_every_operation_fuzzed_answers_as_its_openapi_document_says(
    harness: Harness, admin_headers: dict[str, str]
) -> None:
    await seed(harness)
    document = (await harness.http.get("/v1/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(document)
    started = time.monotonic()
    findings: list[Finding] = []
    statuses: Counter[int] = Counter()
    sent = 0
    # Its own client, without the harness's record of answers: the harness checks that no password
    # the auth service saw is in any answer, and fuzzed strings recur across requests (a password
    # in one, a path in the next, echoed in its problem's ``instance``). Each answer is checked
    # here against the secrets of its own request instead.
    fuzzer = httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.app), base_url=BASE_URL)  # type: ignore[arg-type]
    operations = [result.ok() for result in schema.get_all_operations()]
    ids = {op.definition.raw.get("operationId") for op in operations}
    assert not set(EXCLUDED) - ids, "an excluded operation no longer exists"
    for operation in operations:
        operation_id = operation.definition.raw.get("operationId")
        if operation_id in EXCLUDED:
            continue
        for case in cases_for(operation):
            try:
                arguments = httpx_arguments(case, admin_headers)
                response = await fuzzer.request(**arguments)
            except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError, ValueError):
                continue  # a request no HTTP client can send (a header with a newline): not the server's
            sent += 1
            statuses[response.status_code] += 1
            findings += check(operation.label, case, response)
    await fuzzer.aclose()
    elapsed = time.monotonic() - started
    print(f"schemathesis: {sent} requests over {len(operations) - len(EXCLUDED)} operations in {elapsed:.1f} s;"
          f" statuses {sorted(statuses.items())}")
    assert not findings, f"{len(findings)} findings:\n" + "\n".join(str(f) for f in findings)
    assert sent > 10 * len(operations)
    # Not only refusals: the happy paths ran too.
    assert sum(n for status, n in statuses.items() if status < 300) > len(operations)
    # The session survived the whole run: every answer above was the superadmin's.
    assert (await harness.http.get("/v1/me", headers=admin_headers)).json()["address"] == ADMIN


def secrets_sent(body: Any) -> list[str]:
    """The values of the request's secret fields (``password``, ``old_password``, ``code``...)."""
    if not isinstance(body, dict):
        return []
    return [value for name, value in body.items()
            if isinstance(name, str) and any(word in name for word in SECRET_FIELDS)
            and isinstance(value, str) and len(value) >= 6]


def describe(failure: BaseException) -> str:
    if isinstance(failure, Failure):
        text = f"{failure.title}: {failure.message}"
    else:
        text = str(failure)
    return " ".join(text.split())[:600]


def check(label: str, case: Case, response: httpx.Response) -> list[Finding]:
    out: list[Finding] = []

    def found(problem: str) -> None:
        request = case.as_curl_command(headers={"Authorization": "Bearer <token>"}, base_url=BASE_URL)  # only then
        out.append(Finding(label, request, response.status_code, problem))

    try:
        case.validate_response(response, checks=CHECKS)
    except Failure as failure:
        found(describe(failure))
    except FailureGroup as group:
        for failure in group.exceptions:
            found(describe(failure))
    for secret in secrets_sent(case.body):
        if secret.encode() in response.content:
            found("a secret of the request is in the answer (R-ADM-3)")
    if response.status_code >= 400 and not response.headers.get("content-type", "").startswith(PROBLEM):
        found(f"an error as {response.headers.get('content-type')!r}, not {PROBLEM}")
    return out


pytestmark = pytest.mark.timeout(300)
