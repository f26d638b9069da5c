"""What the gateway and the workers must agree on, and nothing else.

The gateway imports ``audit`` and this package, never another ``workers``
module; the workers never import ``gateway`` (``tests/test_import_rules.py``
holds both rules). See docs/architecture.md, sections "Packages and the rules
between them" and "Contracts".
"""
