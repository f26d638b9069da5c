"""Bench teams: principals in teams with a share of the worker, each with an API key.

Shared by ``bench/fairness.py`` (whose teams are the scenario) and
``bench/soak.py`` (whose teams make a fair job's start give way under the
faults). Each team gets one principal (role ``analyst``) with no usage
limits (the shipped 120 requests a minute or 8 in flight would turn a load
into a measurement of 429s) and its ``share`` in the copied policy's
``govgate_config.teams``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._stack import ROOT

__all__ = ["ROLE", "Team", "create_team_keys", "team_policy_dir"]

#: The role of every bench principal: a shipped role that may use the tiny model, at the default priority.
ROLE = "analyst"


@dataclass(frozen=True)
class Team:
    """A bench team: its name, its weight in the policy, and its one principal."""

    name: str
    share: float

    @property
    def principal(self) -> str:
        return f"{self.name}-user"


def team_policy_dir(var_dir: Path, teams: list[Team]) -> Path:
    """The shipped policy, each bench team and principal without usage limits and with its share."""
    target = var_dir / "policies"
    shutil.copytree(ROOT / "policies", target, ignore=shutil.ignore_patterns("*_test.rego"))
    data_file = target / "data.json"
    document = json.loads(data_file.read_text())
    config = document["govgate_config"]
    limits = config.setdefault("limits", {})
    configured_teams = config.setdefault("teams", {})
    for team in teams:
        limits.setdefault("principals", {})[team.principal] = {}
        limits.setdefault("teams", {})[team.name] = {}
        configured_teams[team.name] = {"share": team.share}
    data_file.write_text(json.dumps(document, indent=2))
    return target


def create_team_keys(settings: Any, teams: list[Team], note: str) -> dict[str, str]:
    """A new key for each team's principal in ``settings``' database: team name -> secret."""
    from gateway.auth import KeyStore
    from gateway.components import open_database

    engine = open_database(settings)
    try:
        store = KeyStore(engine)
        return {team.name: store.create(team.principal, team=team.name, roles=[ROLE], note=note).secret
                for team in teams}
    finally:
        engine.dispose()
