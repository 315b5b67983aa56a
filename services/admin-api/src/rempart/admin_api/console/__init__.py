"""The web console (issue 14): server-rendered pages in the admin API process, under ``/``.

Self-service for every account (password, two-step verification, app passwords, recent logins,
signing out everywhere) and administration for admins (domains, accounts, aliases, helpdesk,
blocked IPs, events, settings, status). The console is a client of the API's own code: its
handlers call the API route functions (:mod:`.calls`), with the same sessions, lockout, roles
and audit. Plain HTML forms, one small script for hints, every asset in this package.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from rempart.admin_api.console import (
    routes_account,
    routes_admin,
    routes_login,
    routes_operations,
    routes_overrides,
)
from rempart.admin_api.console.security import ConsoleSecurity, SecurityHeaders
from rempart.admin_api.console.web import STATIC
from rempart.admin_api.settings import AdminApiSettings


def mount_console(app: FastAPI, settings: AdminApiSettings) -> None:
    """Add the console's pages and assets to the API's app, and its security headers to every
    response. Call it after the app's other middleware, so that a 413 gets the headers too."""
    app.state.console = ConsoleSecurity(settings.secret_key.get_secret_value(), settings.console_secure_cookies)
    for module in (routes_login, routes_account, routes_admin, routes_overrides, routes_operations):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_middleware(SecurityHeaders, hsts=settings.console_secure_cookies)
