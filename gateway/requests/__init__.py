"""The request path of a completion, one module per step.

parse (``schemas``, ``parsing``) → admit (``fit``, ``policy_input``,
``admission``, giving a ``ticket``) → run it to its end (``outcome``);
``audit_records`` and ``request_log`` say what is recorded, ``refusals`` what
a refusal answers. ``service`` is the one entry point the controllers use.
"""
