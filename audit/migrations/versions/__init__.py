"""Audit schema revisions; Alembic skips this file when scanning."""
