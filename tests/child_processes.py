"""Processes for the tests that race several writers: forked by a fork server that has imported them.

Such a test starts 2 to 8 processes at once (appending, migrating, signing
on one database). They cannot be forked from the pytest process, which runs
threads (a forked child can hang on a lock one of them held), and a spawned
one spends about 0.7 s of CPU importing SQLAlchemy, the audit package and its
test module before it races (2 to 5 s per batch under test-busy; dozens of
batches). :data:`CHILDREN` is multiprocessing's ``forkserver`` context: one
single-threaded server, spawned at the first use and kept for the session,
imports :data:`PRELOAD` once and forks each child from itself. The children
are still processes of their own, with their own connections, started
together behind the tests' barriers as before.
"""

from __future__ import annotations

import multiprocessing

#: What the server imports before it forks any child: the modules of the children's targets
#: (each imports the audit package, SQLAlchemy and the drivers they use).
PRELOAD = [
    "tests.audit.test_audit_append",
    "tests.audit.test_audit_store",
    "tests.audit.test_checkpoint_signing",
    "tests.audit.test_checkpointer",
    "tests.audit.test_postgres_store",
    "tests.audit.test_tamper",
]

CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload(PRELOAD)
