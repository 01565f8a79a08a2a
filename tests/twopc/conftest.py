"""The db fixtures of tests/db (SQLite, and PostgreSQL when $KEYVAL_TEST_POSTGRES is set)."""

from tests.db.conftest import backend, database, make_backend, postgres_dsn

__all__ = ["backend", "database", "make_backend", "postgres_dsn"]
