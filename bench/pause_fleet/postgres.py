"""The product on PostgreSQL: checking ``--database``, and a scratch database per run.

Every product run gets a fresh, empty database so no run inherits another's holds or
agents; the URL given names only the server (and the database used to create them).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import psycopg


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead of the one it names."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def masked(url: str) -> str:
    """``url`` with its password, if any, hidden (it is printed with the commands)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def check_admin_url(url: str) -> str | None:
    """Why ``--database`` is unusable, in one line; None if it is usable."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        return f"--database {masked(url)!r}: expected postgresql://[USER@]HOST[:PORT][/DB]"
    try:
        with psycopg.connect(admin_dsn(url), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, ValueError) as exc:
        return f"--database {masked(url)}: cannot connect: {one_line(exc)}"
    return None


def admin_dsn(url: str) -> str:
    """``url``, naming the ``postgres`` database if it names none."""
    return url if urlsplit(url).path.strip("/") else with_database(url, "postgres")


@contextlib.contextmanager
def scratch_database(admin_url: str, slug: str) -> Iterator[str]:
    """A fresh, empty database on ``admin_url``'s server for one run; dropped afterwards."""
    name = f"pause_fleet_{slug.replace('-', '_')}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn(admin_url), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(admin_url, name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
