"""Differential fuzzing: regorus's compiled VM against its interpreter on the shipped policy.

The gateway's evaluators answer on regorus's compiled VM and check it
against the interpreter on their first 32 answers and one in
``GOVGATE_POLICY_VM_CHECK_EVERY`` after that (gateway/policy/vm.py): an
input on which the two differ and that is not sampled is served as the VM
answers it. The case table (tests/policy_cases) and bench/policy_rvm.py
compare the two on inputs someone wrote; this script looks for the inputs
nobody wrote. It starts from realistic ones (the policy bench mix, the
output bench windows, every case of the case table, each with the data it
was written for) and mutates them: fields dropped at every depth, values
of another type (null, booleans, floats, huge and negative numbers, lists,
objects, strings), text with Unicode the normaliser folds (full-width and
mathematical digits, zero-width, RTL marks, astral characters) and with
personal data look-alikes (cards with and without a valid Luhn digit,
IBANs, phones, e-mails, SSNs, private key headers) glued to their
neighbours or at the text's ends, roles with duplicates and unknown names,
purposes, hours, weekdays and times at their edges, usage counters at and
over their limits. The data varies too: the shipped data.json, every
``data`` of the case table and mutated copies of them (values dropped or
of other types anywhere, sections null, entries that are no objects); a
copy the load-time check refuses is not used (no evaluator would serve
it), and one on which the check itself fails (the interpreter stops on
``config_problems`` instead of naming the problem, so the gateway refuses
the data without saying why) is reported.

Each input is asked of ``data.govgate.decision``, ``data.govgate.output_decision``
or ``data.govgate.visible_models`` (as its seed) on both engines. Answers
are compared as parsed JSON; both failing counts as the same; the VM's
"maximum instruction limit" is a known limit (the evaluator falls back to
the interpreter) and not counted. Each difference is printed (rule, data
variant, the input shrunk to a small one that still differs, both answers)
and, with ``--out``, written as a JSON line. Nothing here asserts anything:
it reports, and exits 1 when it found a difference.

Usage::

    .venv/bin/python bench/policy_vm_fuzz.py [--seed 1] [--count 20000] [--rule decision|output_decision|visible_models]
                                             [--policy-dir DIR] [--out FILE] [--no-shrink]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run as `python bench/policy_vm_fuzz.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.policy.child import DECISION_RULE, VISIBLE_MODELS_RULE  # noqa: E402
from gateway.policy.config_check import CONFIG_PROBLEMS_RULE  # noqa: E402
from gateway.policy.output_decision import OUTPUT_DECISION_RULE  # noqa: E402
from gateway.policy.revision import read_policy  # noqa: E402
from gateway.policy.vm import Answer, interpret, run_vm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASE_DIR = ROOT / "tests" / "policy_cases"
RULES = {"decision": DECISION_RULE, "output_decision": OUTPUT_DECISION_RULE, "visible_models": VISIBLE_MODELS_RULE}
#: The VM's budget error: a known limit the evaluator answers on the interpreter, not a difference.
INSTRUCTION_LIMIT = "maximum instruction limit"
#: Differences printed in full per run (all are counted and written to --out).
SHOWN = 20
#: Differences shrunk (the later ones are reported as found: shrinking costs up to a few seconds each).
SHRUNK = 60

# ---------------------------------------------------------------- engines


@dataclass
class Variant:
    """One data variant: the interpreter and the VM holding the policy on it."""

    name: str
    config: Any
    engine: Any
    vm: Any

    def answers(self, rule: str, payload: str) -> tuple[Answer, Answer]:
        return interpret(self.engine, rule, payload), run_vm(self.vm, rule, payload)


def build_variant(name: str, modules: list[tuple[str, str]], data: dict[str, Any]) -> Variant | str | None:
    """Both engines on ``data``; None when the load-time check refuses it (no evaluator would serve it).

    The check's own error instead of its list of problems (the gateway then
    refuses the data without saying what is wrong with it) is returned as text.
    """
    import regorus

    text = json.dumps(data)
    engine = regorus.Engine()
    for path, module in modules:
        engine.add_policy(path, module)
    engine.add_data_json(text)
    engine.set_input_json("{}")
    try:
        problems = engine.eval_rule_as_json(CONFIG_PROBLEMS_RULE)
    except RuntimeError as exc:  # the gateway refuses such data too ("the policy fails its data check")
        return str(exc).split("Stack backtrace")[0].strip()
    if problems not in ('"<undefined>"', "[]"):
        return None
    program = regorus.Program.compile_from_modules(text, modules, list(RULES.values()))
    vm = regorus.Rvm()
    vm.load_program(program)
    vm.set_data_json(text)
    return Variant(name, data.get("govgate_config"), engine, vm)


def differs(slow: Answer, fast: Answer) -> bool:
    """The evaluator's own test (gateway/policy/vm.py), with the instruction limit set aside."""
    if fast.status == "error" and INSTRUCTION_LIMIT in fast.text:
        return False
    if slow.status == "error" and fast.status == "error":
        return False
    return not fast.same_as(slow)


# ---------------------------------------------------------------- seeds


def seeds() -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Seed inputs by rule, and the case table's data variants by name ("shipped" for data.json)."""
    from bench.policy_inputs import sample_inputs
    from bench.policy_outputs import output_windows

    by_rule: dict[str, list[Any]] = {"decision": [], "output_decision": [], "visible_models": []}
    by_rule["decision"] += [s.input for s in sample_inputs()]
    by_rule["output_decision"] += list(output_windows().values())
    configs: dict[str, Any] = {}
    for path in sorted(CASE_DIR.glob("*.json")):
        for case in json.loads(path.read_text(encoding="utf-8")):
            by_rule[case.get("entry", "decision")].append(case["input"])
            if "data" in case:
                configs.setdefault(json.dumps(case["data"], sort_keys=True), case["data"])
    for item in list(by_rule["decision"]):
        if isinstance(item, dict) and isinstance(item.get("principal"), dict):
            by_rule["visible_models"].append({"principal": item["principal"], "models": _model_list()})
    variants = {f"case-data-{i}": config for i, config in enumerate(configs.values())}
    return by_rule, variants


def _model_list() -> list[dict[str, Any]]:
    return [{"name": "gemma-3-270m", "family": "gemma", "context_length": 32768, "tags": []},
            {"name": "govgate-tiny", "family": "llama", "context_length": 8192, "tags": []},
            {"name": "govgate-restricted", "family": "llama", "context_length": 8192, "tags": ["restricted"]},
            {"name": "big", "family": "llama", "context_length": 8192, "tags": []}]


# ---------------------------------------------------------------- mutation

#: Characters the normaliser folds or removes, or that count differently in code points and bytes.
UNICODE_BITS = [
    "\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\u00ad",  # invisible
    "\u202e", "\u202d", "\u200f", "\u061c",  # direction marks
    "\uff14", "\uff11", "\uff10", "\uff0d", "\uff20", "\uff21",  # full-width 4 1 0 - @ A
    "\U0001d7cf", "\U0001d7d2", "\U0001d7ec",  # mathematical digits
    "\u0663", "\u06f5", "\u0967",  # Arabic-Indic, Devanagari digits
    "\u00b2", "\u2075", "\u2460", "\u216b", "\ufb01", "\u2126", "\u212a",  # superscripts, circled, Roman, ligature
    "\u2010", "\u2013", "\u2014", "\u2212", "\ufe63",  # dashes
    "\u00a0", "\u2009", "\u3000", "\t", "\r", "\n",  # spaces
    "\U0001f600", "\U0001f1e9\U0001f1ea", "\U00010348", "\U0002070e",  # astral
    "\u0301", "\u0130", "\u0131", "\u00df", "\u0391", "\u0410", "\u0435",  # combining, Turkish, Greek/Cyrillic
    "\\", "\"", "%", "%s", "{", "}", "$", "'", "\u0000",
]

PII_BITS = [
    "4111 1111 1111 1111", "4111111111111111", "4111-1111-1111-1111", "4111 1111 1111 1112",
    "4111.1111.1111.1111", "378282246310005", "3782.822463.10005", "5500 0000 0000 0004", "6011111111111117",
    "4012888888881881", "1234567812345678", "41111111111111111111", "card4111111111111111",
    "4111111111111111x", "ORD1700000000123",
    "GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432", "DE89 3704 0044 0532 0130 00",
    "DE89370400440532013000", "DE89 3704 0044 0532 0130 01", "FR14 2004 1010 0505 0001 3M02 606",
    "NL91ABNA0417164300", "GB82 WEST 1234 5698 7654 32 TODAY",
    "+44 20 7946 0958", "+1-555-123-4567", "(555) 123-4567", "555.123.4567", "555 123 4567", "+4915112345678",
    "192.168.100.200", "1.2.3.4", "+1 555 123",
    "jane.doe@example.com", "a@b.co", "x@y", "ops-desk@example.org.", "Jane.Doe+tag@sub.example.co.uk",
    "123-45-6789", "123 45 6789", "123456789", "000-00-0000",
    "-----BEGIN RSA PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----", "----- BEGIN OPENSSH PRIVATE KEY -----",
    "---\nBEGIN PRIVATE\nKEY---", "-----BEGIN PGP PRIVATE KEY BLOCK-----", "-----begin private key-----",
    "- - - BEGIN PRIVATE KEY - - -",
]

WORDS = ["hello", "Summarise", "the", "x", "", " ", "\n", "0", "9", "A", "Z", "a1", "IBAN", "card", "SSN:", "@"]


class Mutator:
    """Random changes to a policy input, each at a random place or aimed at a field the rules read."""

    def __init__(self, rng: random.Random, configs: list[Any]) -> None:
        self.rng = rng
        names: set[str] = set()
        purposes: set[str] = set()
        for config in configs:
            if isinstance(config, dict):
                names |= set((config.get("roles") or {}).keys()) | set((config.get("teams") or {}).keys())
                names |= set((config.get("models") or {}).keys())
                purpose = config.get("purposes") or {}
                for key in ("allowed", "required_for_tags"):
                    if isinstance(purpose.get(key), list):
                        purposes |= {p for p in purpose[key] if isinstance(p, str)}
                for settings in (config.get("models") or {}).values():
                    if isinstance(settings, dict) and isinstance(settings.get("purposes"), list):
                        purposes |= {p for p in settings["purposes"] if isinstance(p, str)}
        self.names = sorted(names) + ["admin", "analyst", "viewer", "unknown", "", "Admin", "admin ", "*",
                                      "default", "big", "govgate-tiny", "govgate-restricted", "research", "support"]
        self.purposes = sorted(purposes) + ["", "Research", "evaluation ", "none", "restricted"]

    # -- values

    def scalar(self) -> Any:
        r = self.rng
        return r.choice([
            None, True, False, 0, 1, -1, 2, 5, 9, 10, 23, 24, 25, 59, 60, 61, 100, 128, 255, 256, 257, 1000, 4096,
            0.5, 1.5, -0.0, 1e-9, 99.999, 1e300, -1e300, 2 ** 31, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 1, 2 ** 63,
            2 ** 64 + 7, -(2 ** 63), 10 ** 30, 1.7e18, 9e18, 1699963200000000000,
            "", "0", "1", "null", "true", "x", "admin", "Monday", "restricted", "*", "\u200b", "\U0001f600",
            self.rng.choice(self.names), self.rng.choice(self.purposes),
        ])

    def value(self, depth: int = 0) -> Any:
        roll = self.rng.random()
        if depth > 2 or roll < 0.7:
            return self.scalar()
        if roll < 0.85:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {self.rng.choice(["name", "id", "x", "models", "text", "0", ""]): self.value(depth + 1)
                for _ in range(self.rng.randint(0, 3))}

    def text(self) -> str:
        r = self.rng
        parts: list[str] = []
        for _ in range(r.randint(0, 6)):
            kind = r.random()
            if kind < 0.35:
                parts.append(r.choice(PII_BITS))
            elif kind < 0.6:
                parts.append(r.choice(UNICODE_BITS))
            else:
                parts.append(r.choice(WORDS))
        glue = r.choice(["", " ", "\n", "x", "1", "A", "-", "."])
        text = glue.join(parts)
        if r.random() < 0.15:
            # a finding whose first occurrence is glued to a letter or digit and a later one is not
            # (the detectors' `else` over every occurrence)
            bit = r.choice(PII_BITS)
            text += f" {r.choice(['x', 'A', '7', 'é', '1x'])}{bit}{r.choice(['', 'x', '9'])} {bit}"
        if r.random() < 0.01:
            # many findings: near (or past) the VM's instruction budget
            text += " ".join(r.choice(PII_BITS) for _ in range(r.randint(50, 400)))
        if r.random() < 0.3:
            text = self.sprinkle(text)
        if r.random() < 0.05:
            text = (text + " ") * r.randint(2, 40)
        return text

    def sprinkle(self, text: str) -> str:
        """``text`` with a few folding or invisible characters put in at random places."""
        chars = list(text)
        for _ in range(self.rng.randint(1, 4)):
            chars.insert(self.rng.randint(0, len(chars)), self.rng.choice(UNICODE_BITS))
        return "".join(chars)

    # -- places

    @staticmethod
    def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
        """Every path in ``doc``, the root's (``()``) first."""
        found = [prefix]
        if isinstance(doc, dict):
            for key, value in doc.items():
                found += Mutator.paths(value, prefix + (key,))
        elif isinstance(doc, list):
            for index, value in enumerate(doc):
                found += Mutator.paths(value, prefix + (index,))
        return found

    @staticmethod
    def get(doc: Any, path: tuple) -> Any:
        for step in path:
            doc = doc[step]
        return doc

    @staticmethod
    def put(doc: Any, path: tuple, value: Any) -> Any:
        """``doc`` with ``value`` at ``path``, made as far as needed (an object where a step is missing)."""
        if not path:
            return value
        node = doc
        for step in path[:-1]:
            if isinstance(node, dict):
                if not isinstance(node.get(step), (dict, list)):
                    node[step] = {}
                node = node[step]
            elif isinstance(node, list) and isinstance(step, int) and step < len(node):
                node = node[step]
            else:
                return doc
        if isinstance(node, dict):
            node[path[-1]] = value
        elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
            node[path[-1]] = value
        return doc

    # -- mutations

    def mutate(self, doc: Any, rule: str) -> Any:
        doc = copy.deepcopy(doc)
        steps = self.rng.choice([1, 1, 1, 2, 2, 3, 4])
        for _ in range(steps):
            doc = self.rng.choice(self.MUTATIONS[rule])(self, doc)
        return doc

    def drop(self, doc: Any) -> Any:
        paths = [p for p in self.paths(doc) if p]
        if not paths:
            return doc
        path = self.rng.choice(paths)
        parent = self.get(doc, path[:-1])
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif isinstance(parent, list):
            parent.pop(path[-1])
        return doc

    def retype(self, doc: Any) -> Any:
        path = self.rng.choice(self.paths(doc))
        return self.put(doc, path, self.value())

    def set_field(self, doc: Any, path: tuple, value: Any) -> Any:
        return self.put(doc if isinstance(doc, dict) else {}, path, value)

    def request_text(self, doc: Any) -> Any:
        from gateway.requests.normalize import normalize

        r = self.rng
        original = self._str(doc, ("request", "text"))
        text = self.place(original, self.text())
        doc = self.set_field(doc, ("request", "text"), text)
        roll = r.random()
        if roll < 0.7:
            doc = self.put(doc, ("request", "normalized_text"), normalize(text))
        elif roll < 0.8:
            doc = self.put(doc, ("request", "normalized_text"), self.text())
        elif roll < 0.9 and isinstance(doc.get("request"), dict):
            doc["request"].pop("normalized_text", None)
        return doc

    def output_text(self, doc: Any) -> Any:
        from gateway.requests.normalize import normalize

        original = self._str(doc, ("output", "text"))
        text = self.place(original, self.text())
        doc = self.set_field(doc, ("output", "text"), text)
        roll = self.rng.random()
        if roll < 0.7:
            doc = self.put(doc, ("output", "normalized_text"), normalize(text))
        elif roll < 0.85:
            doc = self.put(doc, ("output", "normalized_text"), self.text())
        elif isinstance(doc.get("output"), dict):
            doc["output"].pop("normalized_text", None)
        return doc

    def place(self, original: str, piece: str) -> str:
        """``piece`` at the start, the end, in the middle of ``original``, or instead of it."""
        where = self.rng.random()
        if where < 0.25:
            return piece
        if where < 0.5:
            return piece + original
        if where < 0.75:
            return original + piece
        cut = self.rng.randint(0, len(original))
        return original[:cut] + piece + original[cut:]

    def _str(self, doc: Any, path: tuple) -> str:
        try:
            value = self.get(doc, path)
        except (KeyError, IndexError, TypeError):
            return ""
        return value if isinstance(value, str) else ""

    def roles(self, doc: Any) -> Any:
        r = self.rng
        roll = r.random()
        if roll < 0.75:
            roles = [r.choice(self.names) for _ in range(r.randint(0, 4))]
            if roles and r.random() < 0.4:
                roles.append(roles[0])  # a duplicate
            if r.random() < 0.2:
                roles.insert(r.randint(0, len(roles)), self.scalar())
        else:
            roles = self.value()
        return self.set_field(doc, ("principal", "roles"), roles)

    def principal(self, doc: Any) -> Any:
        r = self.rng
        key = r.choice(["id", "team", "team", "key_id"])
        value = r.choice([r.choice(self.names), None, "", self.scalar(), "u-1", "t-1", "research", "support"])
        return self.set_field(doc, ("principal", key), value)

    def model(self, doc: Any) -> Any:
        r = self.rng
        if r.random() < 0.5:
            name = r.choice([r.choice(self.names), self.scalar()])
            doc = self.set_field(doc, ("model", "name"), name)
            if r.random() < 0.5 and isinstance(doc.get("request"), dict):
                doc["request"]["model"] = name
        else:
            tags = r.choice([[], ["restricted"], ["restricted", "restricted"], ["x", "restricted"], [None],
                             "restricted", None, [self.scalar()]])
            doc = self.set_field(doc, ("model", "tags"), tags)
        return doc

    def purpose(self, doc: Any) -> Any:
        r = self.rng
        value = r.choice([r.choice(self.purposes), None, "", self.scalar(), [r.choice(self.purposes)]])
        return self.set_field(doc, ("request", "purpose"), value)

    def max_tokens(self, doc: Any) -> Any:
        r = self.rng
        value = r.choice([0, 1, 2, 99, 100, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 2048, 2049, 4096,
                          4097, 1.5, 100.0, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 1, 1e300, -1, "100", None, True, [100]])
        return self.set_field(doc, ("request", "max_tokens"), value)

    def when(self, doc: Any) -> Any:
        r = self.rng
        key = r.choice(["hour_utc", "weekday", "now_ns"])
        if key == "hour_utc":
            value = r.choice([0, 1, 5, 6, 7, 12, 21, 22, 23, 24, -1, 5.5, 6.0, 23.999, "6", None, 2 ** 53])
        elif key == "weekday":
            value = r.choice(["Monday", "Tuesday", "Friday", "Saturday", "Sunday", "monday", "Mon", "", None, 1,
                              ["Monday"], "Sunday ", "\u200bMonday"])
        else:
            value = r.choice([0, 1, -1, 1699963200000000000, 1700000000000000000, 1709164800000000000,
                              1709251199999999999, 1704067199000000000, 951782400000000000, 4102444800000000000,
                              8999999999999999999, 9000000000000000000, 1.7e18, 1.6999632e18, 0.5, "1700000000",
                              None, 2 ** 64, 9007199254740993])
        return self.set_field(doc, ("time", key), value)

    def usage(self, doc: Any) -> Any:
        r = self.rng
        scope = r.choice(["principal", "team"])
        counter = r.choice(["requests_last_minute", "tokens_last_minute", "tokens_today", "tokens_this_month",
                            "in_flight", "minute_window_frees_in_s", "other"])
        value = r.choice([0, 1, 7, 8, 31, 32, 119, 120, 121, 599, 600, 19_800, 19_872, 19_999, 20_000, 99_900,
                          199_872, 199_999, 200_000, 999_999, 1_000_000, 19_999_999, 20_000_000, -1, 0.5, 17.2,
                          60.5, 61, 2 ** 53 - 1, 2 ** 53, 1e300, "3", None, True, [1]])
        if r.random() < 0.1:
            return self.set_field(doc, ("usage", scope), r.choice([None, [], "x", 3, {}]))
        if r.random() < 0.05:
            return self.set_field(doc, ("usage",), r.choice([None, [], "x", 3, {}]))
        return self.set_field(doc, ("usage", scope, counter), value)

    def decision_obligations(self, doc: Any) -> Any:
        r = self.rng
        key = r.choice(["allow", "redact", "max_tokens", "prompt_logging"])
        value = r.choice([True, False, None, ["email"], ["iban", "iban"], [], 100, "full", self.scalar()])
        return self.set_field(doc, ("decision", "obligations", key) if key != "allow" else ("decision", "allow"),
                              value)

    def model_list(self, doc: Any) -> Any:
        r = self.rng
        models = doc.get("models") if isinstance(doc, dict) else None
        models = list(models) if isinstance(models, list) else []
        roll = r.random()
        if roll < 0.4:
            models.append({"name": r.choice([r.choice(self.names), self.scalar()]), "tags": []})
        elif roll < 0.6 and models:
            models.append(models[r.randrange(len(models))])  # a duplicate
        elif roll < 0.8:
            models.insert(r.randint(0, len(models)), self.value())
        else:
            models = r.choice([None, {}, "big", [], [{"name": None}], [{}]])
        return self.set_field(doc, ("models",), models)

    MUTATIONS: dict[str, list[Callable[..., Any]]] = {}


Mutator.MUTATIONS = {
    "decision": [Mutator.drop, Mutator.drop, Mutator.retype, Mutator.retype, Mutator.request_text,
                 Mutator.request_text, Mutator.request_text, Mutator.roles, Mutator.roles, Mutator.principal,
                 Mutator.model, Mutator.purpose, Mutator.max_tokens, Mutator.when, Mutator.when, Mutator.usage,
                 Mutator.usage, Mutator.usage],
    "output_decision": [Mutator.drop, Mutator.retype, Mutator.output_text, Mutator.output_text,
                        Mutator.output_text, Mutator.roles, Mutator.roles, Mutator.principal, Mutator.model,
                        Mutator.purpose, Mutator.decision_obligations],
    "visible_models": [Mutator.drop, Mutator.retype, Mutator.roles, Mutator.roles, Mutator.principal,
                       Mutator.model_list, Mutator.model_list],
}


# ---------------------------------------------------------------- data variants


def mutate_config(rng: random.Random, config: Any) -> Any:
    """A changed copy of ``govgate_config`` (which the load-time check may refuse)."""
    config = copy.deepcopy(config) if isinstance(config, dict) else {}
    choices = [
        ("defaults", "max_tokens_mode", ["deny", "clamp"]),
        ("defaults", "prompt_logging", ["full", "redacted", "hash"]),
        ("defaults", "priority", [0, 9, 5]),
        ("defaults", "max_tokens", [0, 1, 64, 2 ** 53 - 1]),
    ]
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        paths = [path for path in Mutator.paths(config) if path]
        if roll < 0.2 and paths:
            # anywhere: a value dropped or of another type (most such data is refused at load)
            path = rng.choice(paths)
            parent = Mutator.get(config, path[:-1])
            if rng.random() < 0.4:
                parent.pop(path[-1])
            else:
                parent[path[-1]] = rng.choice([None, {}, [], "x", "", 0, 1, -1, 1.5, True, ["x"], {"x": 1}])
        elif roll < 0.35:
            section, key, values = rng.choice(choices)
            _section(config, section)[key] = rng.choice(values)
        elif roll < 0.5 and isinstance(config.get("roles"), dict) and config["roles"]:
            role = _section(config["roles"], rng.choice(sorted(config["roles"])))
            key = rng.choice(["max_tokens_mode", "max_tokens", "priority", "prompt_logging", "models"])
            role[key] = {"max_tokens_mode": rng.choice(["deny", "clamp"]),
                         "max_tokens": rng.choice([0, 1, 100, 256, 4096]),
                         "priority": rng.choice([0, 3, 9]),
                         "prompt_logging": rng.choice(["full", "redacted", "hash"]),
                         "models": rng.choice([[], ["*"], ["big"], ["govgate-tiny", "big"], ["govgate-restricted"]]),
                         }[key]
        elif roll < 0.65:
            teams = _section(config, "teams")
            teams[rng.choice(["t-1", "support", "research", "default"])] = rng.choice(
                [{}, {"models": None}, {"models": []}, {"models": ["*"]}, {"models": ["big"]}, {"share": 2}])
        elif roll < 0.8:
            models = _section(config, "models")
            models[rng.choice(["big", "govgate-tiny", "govgate-restricted"])] = rng.choice([
                {"hours_utc": [22, 6]}, {"hours_utc": [0, 24]}, {"hours_utc": [6, 6]}, {"hours_utc": [0, 0]},
                {"weekdays": []}, {"weekdays": ["Sunday"]}, {"purposes": []}, {"purposes": None},
                {"purposes": ["x"], "hours_utc": None, "weekdays": None}])
        elif roll < 0.85:
            config = _mutate_content(rng, config)
        elif roll < 0.9:
            # sections left out or null, roles without a model list, odd names
            key = rng.choice(["defaults", "roles", "teams", "models", "limits", "purposes", "content"])
            roll = rng.random()
            if roll < 0.3:
                config[key] = rng.choice([None, {}])
            elif roll < 0.6:
                # entries the load-time check lets through though they are no objects
                section = rng.choice(["teams", "models", "roles"])
                entries = config.get(section) if isinstance(config.get(section), dict) else {}
                entries[rng.choice(["t-1", "support", "big", "govgate-tiny", "viewer", "ghost"])] = rng.choice(
                    [None, "x", 3, [], {}])
                config[section] = entries
                if rng.random() < 0.5:
                    limits = config.get("limits") if isinstance(config.get("limits"), dict) else {}
                    kind = limits.get("principals") if isinstance(limits.get("principals"), dict) else {}
                    kind[rng.choice(["u-1", "default", "u-bench"])] = rng.choice([None, {}])
                    limits["principals"] = kind
                    config["limits"] = limits
            else:
                roles = _section(config, "roles")
                roles[rng.choice(["default", "u-1", "*", "", "ghost", "batch"])] = rng.choice(
                    [{}, {"models": ["*"], "max_tokens_mode": "deny", "max_tokens": 0},
                     {"models": ["govgate-tiny"], "priority": 0, "prompt_logging": "hash"}])
                config["roles"] = roles
        elif roll < 0.95:
            config["purposes"] = rng.choice([
                None, {}, {"required_for_tags": []}, {"required_for_tags": ["restricted"], "allowed": None},
                {"required_for_tags": ["restricted", "x"], "allowed": []},
                {"required_for_tags": ["restricted"], "allowed": ["research", "evaluation", "research"]}])
        else:
            limits = _section(config, "limits")
            kind = rng.choice(["principals", "teams"])
            name = rng.choice(["default", "u-1", "u-bench", "t-1", "support", "research"])
            entry = {key: rng.choice([None, 0, 1, 10, 100, 200000]) for key in
                     rng.sample(["requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month",
                                 "in_flight"], rng.randint(0, 5))}
            _section(limits, kind)[name] = entry
    return config


def _section(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]``, made an object first when it is none."""
    if not isinstance(parent.get(key), dict):
        parent[key] = {}
    return parent[key]


def _mutate_content(rng: random.Random, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its content rules changed: detectors, their actions, patterns, output rules."""
    content = config.get("content") if isinstance(config.get("content"), dict) else {}
    content = dict(content)
    roll = rng.random()
    if roll < 0.3:
        names = ["email", "phone", "payment_card", "iban"] + [
            rule["id"] for rule in content.get("national_ids") or [] if isinstance(rule, dict)]
        content["detectors"] = {name: {"action": rng.choice(["deny", "redact"])}
                                for name in rng.sample(names, rng.randint(0, len(names)))}
    elif roll < 0.5:
        content["blocked_patterns"] = rng.choice([
            [], None,
            [{"id": "private_key", "pattern": "(?i)-{3,} ?BEGIN[A-Z ]*PRIVATE ?KEY[A-Z ]*-{3,}",
              "ignore_spacing": rng.choice([True, False])}],
            [{"id": "secret", "pattern": "secret", "message": "no secrets"},
             {"id": "word", "pattern": "(?i)^hello$", "ignore_spacing": True}],
            [{"id": "dup", "pattern": "x"}, {"id": "dup", "pattern": "y", "message": None}],
        ])
    elif roll < 0.7:
        content["national_ids"] = rng.choice([
            [], None, [{"id": "us_ssn", "pattern": "[0-9]{3}[ -][0-9]{2}[ -][0-9]{4}"}],
            [{"id": "us_ssn", "pattern": "[0-9]{3}[ -][0-9]{2}[ -][0-9]{4}"},
             {"id": "de_tax", "pattern": "[0-9]{11}"}, {"id": "empty_ok", "pattern": "x*"}],
        ])
        detectors = dict(content.get("detectors") or {})
        for rule in content.get("national_ids") or []:
            detectors.setdefault(rule["id"], {"action": rng.choice(["deny", "redact"])})
        content["detectors"] = {name: entry for name, entry in detectors.items()
                                if name in {"email", "phone", "payment_card", "iban"}
                                or name in {rule["id"] for rule in content.get("national_ids") or []}}
    else:
        output = dict(content.get("output") or {}) if isinstance(content.get("output"), dict) else {}
        names = ["email", "phone", "payment_card", "iban"]
        if rng.random() < 0.5:
            output["detectors"] = {name: {"action": rng.choice(["allow", "redact", "stop"])}
                                   for name in rng.sample(names, rng.randint(0, 4))}
        else:
            output["roles"] = {role: {name: rng.choice(["allow", "redact", "stop"])
                                      for name in rng.sample(names, rng.randint(0, 3))}
                               for role in rng.sample(["admin", "analyst", "viewer", "ghost"], rng.randint(0, 3))}
        content["output"] = rng.choice([output, output, None, {}])
    config["content"] = content
    return config


# ---------------------------------------------------------------- shrinking


def shrink(check: Callable[[Any], bool], doc: Any, budget: int = 3000) -> Any:
    """A smaller input on which ``check`` still holds: fields dropped, values simplified, strings cut."""
    tried = 0
    changed = True
    while changed and tried < budget:
        changed = False
        for candidate in _smaller(doc):
            tried += 1
            if tried >= budget:
                break
            if check(candidate):
                doc, changed = candidate, True
                break
    return doc


def _smaller(doc: Any):
    """Each one-step simplification of ``doc``, the larger cuts first."""
    if isinstance(doc, dict):
        for key in list(doc):
            yield {k: v for k, v in doc.items() if k != key}
        for key, value in doc.items():
            for smaller in _smaller(value):
                yield {**doc, key: smaller}
    elif isinstance(doc, list):
        for index in range(len(doc)):
            yield doc[:index] + doc[index + 1:]
        for index, value in enumerate(doc):
            for smaller in _smaller(value):
                yield doc[:index] + [smaller] + doc[index + 1:]
    elif isinstance(doc, str) and doc:
        half = len(doc) // 2
        if half:
            yield doc[:half]
            yield doc[half:]
        for index in range(len(doc)):
            yield doc[:index] + doc[index + 1:]
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool) and doc not in (0, 1):
        yield 0
        yield 1


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=20000, help="inputs compared (default 20000)")
    parser.add_argument("--rule", choices=sorted(RULES), action="append",
                        help="the rules asked (default: all three); may be given more than once")
    parser.add_argument("--policy-dir", type=Path, default=ROOT / "policies")
    parser.add_argument("--data-mutants", type=int, default=12, help="mutated data variants tried (default 12)")
    parser.add_argument("--out", type=Path, default=None, help="write each difference here as a JSON line")
    parser.add_argument("--no-shrink", action="store_true", help="report differences as found, unshrunk")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    snapshot = read_policy(args.policy_dir)
    modules = list(snapshot.modules)
    base = snapshot.base_data()
    seed_inputs, configs = seeds()
    named = {"shipped": base.get("govgate_config"), **configs}
    for index in range(args.data_mutants):
        named[f"mutant-{index}"] = mutate_config(rng, rng.choice(list(named.values())))
    variants: list[Variant] = []
    refused = 0
    check_errors: list[dict[str, Any]] = []
    for name, config in named.items():
        variant = build_variant(name, modules, {**base, "govgate_config": config})
        if isinstance(variant, str):
            check_errors.append({"rule": "config_problems", "data": name, "config": config, "error": variant})
            print(f"LOAD-TIME CHECK ERROR on data {name}: {variant} "
                  f"(govgate_config {json.dumps(config, ensure_ascii=False)})", flush=True)
        elif variant is None:
            refused += 1
        else:
            variants.append(variant)
    rules = args.rule or sorted(RULES)
    mutator = Mutator(rng, [v.config for v in variants])
    out = args.out.open("w", encoding="utf-8") if args.out else None
    for record in check_errors:
        if out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    found: list[dict[str, Any]] = list(check_errors)
    signatures: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    counts = {"compared": 0, "differ": 0, "limit": 0, "both_error": 0}
    started = time.monotonic()
    print(f"{len(variants)} data variants ({refused} mutated ones refused by the load-time check), "
          f"rules {', '.join(rules)}, seed {args.seed}, {args.count} inputs", flush=True)
    for number in range(args.count):
        rule_name = rules[number % len(rules)]
        rule = RULES[rule_name]
        variant = variants[rng.randrange(len(variants))]
        pool = seed_inputs[rule_name]
        doc = pool[rng.randrange(len(pool))]
        if rng.random() < 0.95:
            doc = mutator.mutate(doc, rule_name)
        payload = json.dumps(doc, ensure_ascii=rng.random() < 0.2)
        slow, fast = variant.answers(rule, payload)
        counts["compared"] += 1
        outcome = slow.status if slow.status != "ok" else _outcome(slow.text)
        outcomes[f"{rule_name}: {outcome}"] = outcomes.get(f"{rule_name}: {outcome}", 0) + 1
        if fast.status == "error" and INSTRUCTION_LIMIT in fast.text:
            counts["limit"] += 1
        elif slow.status == fast.status == "error":
            counts["both_error"] += 1
        if (number + 1) % 5000 == 0:
            print(f"... {number + 1} inputs, {counts['differ']} differences", flush=True)
        if not differs(slow, fast):
            continue
        counts["differ"] += 1
        small = doc if args.no_shrink or counts["differ"] > SHRUNK else shrink(
            lambda candidate: differs(*variant.answers(rule, json.dumps(candidate))), doc)
        slow, fast = variant.answers(rule, json.dumps(small))
        signature = f"{rule_name} {variant.name} {_shape(small)}"
        signatures[signature] = signatures.get(signature, 0) + 1
        record = {"rule": rule_name, "data": variant.name, "input": small, "interpreter": _shown(slow),
                  "vm": _shown(fast)}
        if out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
        if len(found) < SHOWN and signatures[signature] == 1:
            print(f"DIFFERENCE {json.dumps(record, ensure_ascii=False)}", flush=True)
        found.append(record)
    elapsed = time.monotonic() - started
    print(f"{counts['compared']} inputs compared in {elapsed:.0f} s: {counts['differ']} differences "
          f"({len(signatures)} shapes); {counts['limit']} VM instruction-limit stops; "
          f"{counts['both_error']} errors on both; {len(check_errors)} data variants the load-time check "
          f"failed on")
    print("interpreter's answers: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    for signature, times in sorted(signatures.items(), key=lambda item: -item[1]):
        print(f"  {times:6d}  {signature}")
    if out:
        out.close()
    return 1 if found else 0


def _shape(doc: Any) -> str:
    """The shrunk input's structure without its values: differences of one cause share it."""
    if isinstance(doc, dict):
        return "{" + ",".join(f"{k}:{_shape(v)}" for k, v in sorted(doc.items())) + "}"
    if isinstance(doc, list):
        return "[" + ",".join(_shape(v) for v in doc) + "]"
    return type(doc).__name__


def _outcome(text: str) -> str:
    """What an answer says, in a word: allowed, denied (with its first reason code), or a list's size."""
    value = json.loads(text)
    if isinstance(value, dict) and "allow" in value:
        if value["allow"]:
            return "allowed"
        reasons = value.get("reasons") or [{}]
        return f"denied {reasons[0].get('code')}"
    if isinstance(value, list):
        return "empty list" if not value else "non-empty list"
    return type(value).__name__


def _shown(answer: Answer) -> Any:
    if answer.status == "ok":
        return json.loads(answer.text)
    return {"status": answer.status, "text": answer.text[:300]}


if __name__ == "__main__":
    sys.exit(main())
