"""Alembic migrations of the audit schema (run them with :func:`audit.db.migrate`).

A regular package so that the revision scripts ship with the distribution.
"""
