"""The review API's service: who may read which entries, reading them, and review actions on the chain.

The controller (``gateway/api/review.py``) only parses HTTP and hands over;
this package decides access (:mod:`gateway.review.access`), reads query
parameters (:mod:`gateway.review.params`) and does the work
(:mod:`gateway.review.service`).
"""
