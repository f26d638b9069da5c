"""The product's entry point: the ``govgate`` command, the supervisor behind
``govgate up`` and the embedded Redis it starts.

It sits above both sides: it may import ``gateway``, ``workers`` and
``audit`` because it starts all of them; nothing under them imports it.
See docs/architecture.md ("Processes").
"""
