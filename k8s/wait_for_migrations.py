"""Wait until the database DATABASE_URL names is at the newest Alembic revision; the scorer's init container.

    python k8s/wait_for_migrations.py [--timeout 600] [--interval 5]

Exit 0 once the database's revision equals migrations/' head, 1 if it has not after --timeout seconds (the
Pod's init container then restarts with back-off and says why in its log). It never migrates: the migration
Job (k8s/base/migrate-job.yaml) does, once, so replicas starting together never race on `alembic upgrade`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import sqlalchemy as sa
from rewardprism.store import migrate
from rewardprism.store.config import DEFAULT_URL, safe_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait in all (0: check once)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between checks")
    args = parser.parse_args(argv)

    url = os.environ.get("DATABASE_URL", DEFAULT_URL)
    head = migrate.head_revision()
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            current: str | None = migrate.current_revision(url)
            state = f"at revision {current or 'none (empty)'}"
        except sa.exc.SQLAlchemyError as exc:  # unreachable, auth, DNS: all "not yet"; no URL echoed
            current, state = None, f"unreachable ({type(exc).__name__})"
        if current == head:
            print(f"{safe_url(url)} is at head {head}", flush=True)
            return 0
        if time.monotonic() >= deadline:
            print(
                f"{safe_url(url)} is {state}, not at head {head}: has the migration Job "
                "(rewardprism-migrate) run? `kubectl logs job/rewardprism-migrate`",
                file=sys.stderr,
            )
            return 1
        print(f"waiting: {safe_url(url)} is {state}, head is {head}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
