"""What the gateway and the workers must agree on, and nothing else.

The gateway imports ``audit`` and this package, never another ``workers``
module; the workers never import ``gateway`` (``tests/test_import_rules.py``
holds both rules). Here live the job and result types (``jobs``), the sampling
settings a job carries (``sampling``), the Celery settings both sides share
(``celery_config``), the model registry, prompt rendering, the tokenizers
that count a prompt without loading weights, the sealing and privacy rules
for text that crosses Redis, and the pending terminal entries a worker
leaves for the gateway. See docs/architecture.md.
"""
