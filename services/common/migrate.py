"""Applies the ordered SQL migrations of services/common/sql/migrations.

Owns the table `public.docimport_schema_migrations` (version, name, sha256
checksum, applied_at). Files are named `NNNN_description.sql` and applied
in order, each in its own transaction. A session-level advisory lock makes
concurrent runs safe: the second waits, then finds nothing to do. Re-running
is a no-op; a migration whose file changed after it was applied is an error
(checksum mismatch), never silently re-applied.

This is the `docimport-migrate` command (a Kubernetes Job before a rollout);
services never migrate on start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "sql" / "migrations"
# Any constant shared by every migration runner: "docimport" in hex-ish.
LOCK_ID = 0x646F63696D70


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    """The database's migration history disagrees with the files."""


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        number, _, rest = path.stem.partition("_")
        if not number.isdigit():
            raise MigrationError(f"{path.name}: a migration file name starts with its number")
        found.append(Migration(int(number), rest or path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {directory}")
    return found


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Applies what is missing; returns the migrations applied by this call."""
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_ID)
        try:
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS public.docimport_schema_migrations (
                    version    integer     PRIMARY KEY,
                    name       text        NOT NULL,
                    checksum   text        NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            rows = await conn.fetch("SELECT version, name, checksum FROM public.docimport_schema_migrations")
            applied = {r["version"]: r for r in rows}
            known = {m.version for m in migrations}
            unknown = sorted(set(applied) - known)
            if unknown:
                raise MigrationError(
                    f"the database has migrations {unknown} that this release does not know; "
                    "it was migrated by a newer docimport"
                )
            done = []
            for migration in migrations:
                previous = applied.get(migration.version)
                if previous is not None:
                    if previous["checksum"] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} changed after it was "
                            "applied (checksum mismatch); add a new migration instead"
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO public.docimport_schema_migrations (version, name, checksum) "
                        "VALUES ($1, $2, $3)",
                        migration.version, migration.name, migration.checksum,
                    )
                logger.info("applied migration %04d_%s", migration.version, migration.name)
                done.append(migration)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_ID)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    """docimport-migrate: apply pending migrations to DOCIMPORT_DATABASE_URL."""
    from services.common import logging as jsonlog

    parser = argparse.ArgumentParser(prog="docimport-migrate", description=main.__doc__)
    parser.add_argument("--database-url", default=os.environ.get("DOCIMPORT_DATABASE_URL"),
                        help="libpq URL (default: $DOCIMPORT_DATABASE_URL)")
    args = parser.parse_args(argv)
    jsonlog.configure("migrate", os.environ.get("DOCIMPORT_LOG_LEVEL", "INFO"))
    if not args.database_url:
        print("docimport-migrate: set DOCIMPORT_DATABASE_URL or pass --database-url", file=sys.stderr)
        return 2
    try:
        applied = asyncio.run(migrate(args.database_url))
    except MigrationError as exc:
        print(f"docimport-migrate: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"docimport-migrate: cannot migrate: {exc}", file=sys.stderr)
        return 1
    print(f"docimport-migrate: {len(applied)} migration(s) applied; schema is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
