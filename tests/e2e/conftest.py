from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import LocalCluster


def _backends() -> list[object]:
    dsn = os.environ.get("KEYVAL_TEST_POSTGRES")
    postgres = pytest.param(
        dsn,
        id="postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(
                not dsn, reason="KEYVAL_TEST_POSTGRES is not set: no PostgreSQL to test against"
            ),
        ],
    )
    return [pytest.param(None, id="sqlite"), postgres]


@pytest.fixture(scope="module", params=_backends())
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    backend = request.param
    if backend:
        backend = _fresh_postgres_schema(backend)
    running = LocalCluster(tmp_path_factory.mktemp("cluster"), backend=backend)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _fresh_postgres_schema(dsn: str) -> str:
    """A DSN whose search_path is a new, empty schema, so runs never see each other's data."""
    import uuid

    import psycopg

    schema = f"keyval_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in dsn else "?"
    return f"{dsn}{separator}options=-csearch_path%3D{schema}"
