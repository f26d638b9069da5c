"""A model the key may not see is refused exactly like one that does not exist.

``GET /v1/models`` lists only the models the policy's ``visible_models``
entry point gives a key. A completion naming a model the registry lacks is
refused at once with 404 ``model_not_found``; one naming a model the key may
not see used to reach the policy and be refused 403 ``policy_denied`` naming
the model and the rule (a team's list, a role's), so any key could learn
which models exist. OpenAI answers both cases alike ("does not exist or you
do not have access to it"), and so does this gateway: whatever refusal a
request for a hidden model meets (a body that does not fit it, usage
counters that cannot be read, the policy's denial, any admission check),
the client gets the very error an unknown name gets, while the audit entry
keeps the real refusal and what the client was told (``answered``), and the
metrics count the request under the real refusal's code.

Visibility is asked of the same entry point ``GET /v1/models`` asks, with
the same views of the key and the model, so the list and the refusal cannot
disagree; it is asked only when a request is refused, so an admitted
request costs nothing more, and the answer is kept per key, model and
policy revision (:class:`SeenModels`), so a client refused again and again
(a 429 storm) costs no second evaluation per refusal. The first refusal of a
hidden model costs that one more evaluation after the others, where an unknown name is refused before
any: docs/architecture.md ("Models a key may not see") says what that means
for timing.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.api_errors import ApiError
from gateway.auth import Principal
from gateway.policy import POLICY_UNAVAILABLE, PolicyUnavailable
from gateway.policy.engine import UNAVAILABLE_RETRY_AFTER_S
from gateway.policy.reloader import ReloadingPolicyEngine
from workers.contract.privacy import Digester
from workers.contract.registry import ModelSpec

MODEL_NOT_FOUND = "model_not_found"
#: What the refusal of an unknown model says after its name.
_NOT_FOUND_REST = "does not exist or you do not have access to it. GET /v1/models lists the models you may use."


def model_not_found(model: str) -> ApiError:
    """The one answer for a model name the registry lacks and for a model the key may not see.

    The name is text of the body: a rejection's audit entry keeps the message
    with ``'…'`` in its place (``logged_message``), whatever quote marks the name holds.
    """
    return ApiError(404, "model_not_found", f"The model '{model}' {_NOT_FOUND_REST}", param="model",
                    logged_message=f"The model '…' {_NOT_FOUND_REST}")


def policy_unavailable(exc: PolicyUnavailable) -> ApiError:
    """503 when the policy could not say in time which models a key may see (an empty list or a guess
    would tell the client something false)."""
    retry_after = math.ceil(UNAVAILABLE_RETRY_AFTER_S)
    return ApiError(503, POLICY_UNAVAILABLE, f"No policy decision could be had in time ({exc}); try again in "
                    f"{retry_after} s.", headers={"Retry-After": str(retry_after)})


#: Answers kept (key, model, revision); the oldest goes first when full.
_SEEN_KEPT = 4096


class SeenModels:
    """Whether the policy's ``visible_models`` lists a model for a key, asked once per policy revision.

    The answer depends only on what the policy is given (the key's view and
    the model's) and on the policy itself, which the revision names: the
    same question under the same revision has the same answer, so it is kept
    (bounded) and asked again only when the revision changes. Only an answer
    the policy gave is kept: an evaluation that failed (an evaluator lost, OPA
    out of sync) counts as hidden for that refusal alone, or a model the key
    may see would be answered as unknown until the next reload.
    """

    def __init__(self, policy: ReloadingPolicyEngine, kept: int = _SEEN_KEPT) -> None:
        if kept < 1:
            raise ValueError("SeenModels keeps at least one answer")
        self._policy = policy
        self._kept = kept
        self._known: dict[tuple[Any, ...], bool] = {}

    async def may_see(self, principal: Principal, spec: ModelSpec) -> bool:
        """Whether ``principal`` may see ``spec`` (as ``GET /v1/models`` asks); raises
        :class:`PolicyUnavailable` when the policy cannot answer in time (nothing is kept then)."""
        revision = self._policy.revision
        key = (revision, principal.id, principal.team, tuple(principal.roles), principal.key_id, spec.name)
        known = self._known.get(key)
        if known is not None:
            return known
        names = await self._policy.visible_models_known(principal.policy_view(), [spec.policy_view()])
        visible = names is not None and spec.name in names  # a failed evaluation fails closed, this once
        if names is not None and self._policy.revision == revision:  # the policy's answer, under that revision
            if len(self._known) >= self._kept:
                del self._known[next(iter(self._known))]
            self._known[key] = visible
        return visible


async def as_answered(seen: SeenModels, principal: Principal, spec: ModelSpec, asked: str,
                      refusal: ApiError) -> ApiError:
    """What the client is told of ``refusal`` of a request for ``spec`` (named ``asked`` in the body).

    ``refusal`` itself when the key may see the model; else the unknown
    model's 404, counted in the metrics under ``refusal``'s code. When the
    policy cannot say, a 503 ``policy_unavailable`` (``refusal`` itself if it
    is one): ``refusal`` might name a model the key may not see.
    """
    try:
        visible = await seen.may_see(principal, spec)
    except PolicyUnavailable as exc:
        if refusal.code == POLICY_UNAVAILABLE:
            return refusal
        answer = policy_unavailable(exc)
    else:
        if visible:
            return refusal
        answer = model_not_found(asked)
    answer.counted_as = refusal.code
    return answer


def answered_record(refusal: ApiError, answer: ApiError, raw: bytes | None = None,
                    digester: Digester | None = None) -> dict[str, Any] | None:
    """What an audit entry adds when the client was told something other than ``refusal``: the status and
    code it got, and why (None when it got ``refusal``).

    ``raw``, the request's body, given for a request entry (``digester`` with
    it): an answer as an unknown model then keeps the body's size and keyed
    digest, which the unknown name's ``rejected`` entry holds, so the review
    API can show the key its own entry as that rejection
    (gateway/review/as_told.py) with nothing missing.
    """
    if answer is refusal:
        return None
    why = ("the key may not see the model (GET /v1/models leaves it out): refused as an unknown model"
           if answer.code == MODEL_NOT_FOUND else
           "the policy could not say in time whether the key may see the model")
    record: dict[str, Any] = {"status": answer.status, "code": answer.code, "why": why}
    if raw is not None and digester is not None and answer.code == MODEL_NOT_FOUND:
        record.update(body_bytes=len(raw), body_hmac_sha256=digester.hexdigest(raw))
    return record
