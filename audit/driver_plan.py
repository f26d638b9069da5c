"""What a process needs to append to the audit store on the database driver alone, as plain data.

Made where SQLAlchemy is loaded (:func:`audit.append_plan.driver_plan`), from
the engine and the SQLModel table; used by :class:`audit.driver_store.DriverStore`
in a process that never imports SQLAlchemy (a model worker: the ORM, SQLModel
and pydantic would be about 28 MB of its memory, beside a model of a few MB).
JSON, so a worker's short-lived store-prep child can hand it to its parent.
It holds the database password when the URL has one: it travels between a
process and its child over a pipe and is never written or logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .appender import AppendStatements

#: Bumped when the plan's fields change (a parent and its child always run the same code; checked all the same).
PLAN_VERSION = 1


@dataclass(frozen=True, slots=True)
class DriverPlan:
    """The database, how to connect to it, and the statements to run there."""

    #: ``sqlite`` or ``postgresql`` (the driver: ``sqlite3`` or ``psycopg``).
    dialect: str
    #: What SQLAlchemy's dialect passes the driver's ``connect`` (the URL's parts and :func:`audit.db.make_engine`'s).
    connect_args: tuple[Any, ...]
    connect_kwargs: dict[str, Any]
    busy_timeout_s: float
    #: The database's URL without its password, for error messages.
    described: str
    append: AppendStatements
    #: Every column of the entry whose ``terminal_request_id`` is the one bound parameter.
    terminal_sql: str
    #: The ``chain_format`` boundary's seq (no parameter).
    boundary_sql: str
    #: The column order of ``terminal_sql``'s rows.
    columns: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"version": PLAN_VERSION, "dialect": self.dialect, "connect_args": list(self.connect_args),
                           "connect_kwargs": self.connect_kwargs, "busy_timeout_s": self.busy_timeout_s,
                           "described": self.described, "append": self.append.to_dict(),
                           "terminal_sql": self.terminal_sql, "boundary_sql": self.boundary_sql,
                           "columns": list(self.columns)})

    @classmethod
    def from_json(cls, text: str) -> "DriverPlan":
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"audit driver plan version {data.get('version')!r}, expected {PLAN_VERSION}")
        return cls(dialect=data["dialect"], connect_args=tuple(data["connect_args"]),
                   connect_kwargs=dict(data["connect_kwargs"]), busy_timeout_s=float(data["busy_timeout_s"]),
                   described=data["described"], append=AppendStatements.from_dict(data["append"]),
                   terminal_sql=data["terminal_sql"], boundary_sql=data["boundary_sql"],
                   columns=tuple(data["columns"]))
