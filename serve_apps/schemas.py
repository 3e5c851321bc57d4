"""Request and response bodies of the HTTP API, separate from the store's tables but sharing their limits.

Unknown fields are refused (a misspelt `response` must not pass as "no responses"). Numbers that reach a
profile must be finite and bounded, so NaN or inf can neither come in nor go out.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, field_validator, model_validator
from rewardprism.bounds import MAX_ABS_WEIGHT
from rewardprism.data import Prompt
from rewardprism.store import Limits, checks
from rewardprism.store.models import EXTERNAL_ID_MAX, NAME_MAX, SOURCE_MAX, URI_MAX

LIMITS = Limits()  # the store's field limits; it checks them again (with any RP_MAX_* overrides) on write
MAX_RESPONSES = 1024  # the schema's hard cap; the live limit (settings.max_responses) is checked per request

NO_NUL = r"^[^\x00]*$"  # Postgres text cannot hold NUL characters: refuse them at the door, for every backend

UserId = Annotated[str, StringConstraints(min_length=1, max_length=EXTERNAL_ID_MAX, pattern=NO_NUL)]
Text = Annotated[str, StringConstraints(max_length=LIMITS.max_text_chars, pattern=NO_NUL)]
PromptText = Annotated[str, StringConstraints(min_length=1, max_length=LIMITS.max_text_chars, pattern=NO_NUL)]
Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_WEIGHT, le=MAX_ABS_WEIGHT)]
Flag = Annotated[bool, Strict()]  # true or false only: "yes", 1 or "on" are 422, not quietly true


def storable_json(document: Any, what: str, max_depth: int = checks.MAX_JSON_DEPTH) -> Any:
    """A JSON document the store can keep: bounded nesting (checked first: encoders recurse), no NaN or
    infinity, no NUL character anywhere (JSONB refuses it)."""
    checks.json_depth(document, what, max_depth)
    try:
        text = json.dumps(document, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"must be plain JSON without NaN or infinity ({exc})") from None
    if "\\u0000" in text:
        raise ValueError("must not contain NUL characters")
    return document


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Body):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL)]
    content: Text


def _absent_not_null(schema: dict[str, Any]) -> None:
    """In the JSON schema, an optional field is its type, left out when absent (`oneOf`), never `null`."""
    schema.update(next(s for s in schema.pop("anyOf") if s.get("type") != "null"))


class Conversation(Body):
    """A prompt as plain text (`prompt`) or as chat messages (`messages`): exactly one of them."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    prompt: PromptText | None = Field(None, json_schema_extra=_absent_not_null)
    messages: list[Message] | None = Field(None, min_length=1, max_length=256, json_schema_extra=_absent_not_null)

    @model_validator(mode="after")
    def _one_prompt(self) -> Conversation:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (chat turns)")
        return self

    @property
    def conversation(self) -> Prompt:
        return self.prompt if self.prompt is not None else [m.model_dump() for m in self.messages or []]


class ScoreRequest(Conversation):
    user_id: UserId | None = Field(None, description="omit for the default profile (or a key's bound user)")
    responses: list[Text] = Field(min_length=1, max_length=MAX_RESPONSES)
    explain: Flag = Field(False, description="add each head's contribution to every score")
    explain_top: int | None = Field(None, ge=1, description="only the heads with the largest contributions "
                                                            "(heads contributing 0 are left out)")


class CompareRequest(Conversation):
    user_id: UserId | None = None
    a: Text
    b: Text


# one spelling per query (no leading zeros): the pairs a user answered are found by their id's prefix
NUMBER = "(0|[1-9][0-9]{0,9})"
QueryId = Annotated[str, StringConstraints(pattern=rf"^(pool:{NUMBER}:{NUMBER}|resp:[0-9a-f]{{40}})$")]


class PairIn(Conversation):
    chosen: Text
    rejected: Text
    source: Annotated[str, StringConstraints(min_length=1, max_length=SOURCE_MAX, pattern=NO_NUL)] = "api"
    query_id: QueryId | None = Field(None, description="the query this label answers (from POST .../queries); "
                                                       "it must name this prompt and these two responses",
                                     json_schema_extra=_absent_not_null)


class FeedbackRequest(Body):
    pairs: list[PairIn] = Field(min_length=1, max_length=LIMITS.max_pairs_per_call)


MAX_QUERIES = 50  # pairs one query may ask for
PoolName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class QueryRequest(Body):
    """Which pairs to ask a user next: from a registered pool, or among responses the client has for one prompt."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["pool"]}, {"required": ["responses"]}]})

    k: int = Field(1, ge=1, le=MAX_QUERIES, description="how many pairs to ask")
    method: Literal["information", "uncertainty", "random"] = "information"
    pool: PoolName | None = Field(None, description="a pool registered with the served head set",
                                  json_schema_extra=_absent_not_null)
    prompt: PromptText | None = Field(None, json_schema_extra=_absent_not_null)
    messages: list[Message] | None = Field(None, min_length=1, max_length=256, json_schema_extra=_absent_not_null)
    responses: list[Text] | None = Field(None, min_length=2, max_length=MAX_RESPONSES,
                                         description="two or more responses to the prompt: which pairs to ask",
                                         json_schema_extra=_absent_not_null)

    @model_validator(mode="after")
    def _one_source(self) -> QueryRequest:
        prompts = (self.prompt is not None) + (self.messages is not None)
        if self.pool is not None:
            if prompts or self.responses is not None:
                raise ValueError("give either 'pool' or a prompt with 'responses', not both")
        elif self.responses is None or prompts != 1:
            raise ValueError("give 'pool', or 'responses' with exactly one of 'prompt' or 'messages'")
        return self

    @property
    def conversation(self) -> Prompt:
        return self.prompt if self.prompt is not None else [m.model_dump() for m in self.messages or []]


class Query(BaseModel):
    query_id: str = Field(description="cite it as pairs[].query_id when sending the user's answer as feedback")
    prompt: str | list[dict[str, str]]
    a: str
    b: str
    responses: list[int] | None = Field(None, description="indices of a and b in the request's responses")


class QueryResponse(BaseModel):
    user_id: str
    queries: list[Query]
    method: str
    labelled: int = Field(description="the user's feedback pairs the posterior was fitted on")
    candidates: int = Field(description="pairs the queries were chosen from")
    head_set: str


class ProfileUsed(BaseModel):
    """Which profile scored a request, and why it was the default one when it was."""

    user_id: str | None
    version: int | None = Field(description="the stored profile's version; null for the default profile")
    source: Literal["user", "default"]
    reason: Literal["no_user", "unknown_user", "no_profile", "other_head_set", "invalid_profile",
                    "database_unavailable"] | None = None
    stale: bool = Field(False, description="the database could not be asked in time: this replica's last known "
                                           "state of the user was used")


class Contribution(BaseModel):
    head: str
    head_score: float
    weight: float
    contribution: float
    summary: str | None = Field(None, description="what the head means, in one line: its card (`GET /v1/heads`); "
                                                  "null when the head set has no cards")


class ScoredResponse(BaseModel):
    index: int
    score: float
    truncated: bool = Field(description="the text was longer than the token limit and its end was cut")
    explanation: list[Contribution] | None = None


class ScoreResponse(BaseModel):
    scores: list[ScoredResponse]
    bias: float = Field(description="the profile's bias: each score is its contributions' sum plus this")
    profile: ProfileUsed
    head_set: str


class CompareResponse(BaseModel):
    probability_a: float = Field(description="P(a preferred over b) = sigmoid(score_a - score_b)")
    score_a: float
    score_b: float
    truncated: bool
    profile: ProfileUsed
    head_set: str


class ProfileOut(BaseModel):
    user_id: str
    version: int | None
    head_set: str
    method: str
    n_pairs: int
    bias: float
    weights: list[float]
    head_names: list[str]
    updated_at: datetime | None


class FeedbackResponse(BaseModel):
    user_id: str
    stored: int = Field(description="pairs stored by this call")
    profile: ProfileOut


# ---------------------------------------------------------------------------------------------- admin


class UserCreate(Body):
    external_id: UserId
    display_name: Annotated[str, StringConstraints(max_length=NAME_MAX, pattern=NO_NUL)] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _storable(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        return storable_json(metadata, "metadata")


class UserPatch(Body):
    disabled: Flag


class UserOut(BaseModel):
    external_id: str
    display_name: str | None
    metadata: dict[str, Any]
    metadata_error: str | None = Field(None, description="why `metadata` is shown empty: a document stored by "
                                                         "an older version that no longer passes the checks")
    disabled: bool
    created_at: datetime
    profile: ProfileOut | None


class HeadCardOut(BaseModel):
    head: str
    summary: str | None = Field(None, description="what the head means, in one line (null: the head set has no "
                                                 "cards; `rewardprism heads show DIR --embeddings EMB` makes them)")
    explained_variance_ratio: float | None = None
    correlations: list[dict[str, Any]] = Field([], description="[{attribute, r}]: rating attributes its margins "
                                                               "correlate with, strongest first")
    groups: list[dict[str, Any]] = Field([], description="[{group, mean_margin_sd}], the group favouring it most "
                                                         "first")
    highest: list[dict[str, Any]] | None = Field(None, description="with `excerpts=true`: training pairs it "
                                                                    "scores highest ({prompt, chosen, rejected, "
                                                                    "margin}, excerpts)")
    lowest: list[dict[str, Any]] | None = None


class HeadsOut(BaseModel):
    head_set: str = Field(description="the served head set, name@version")
    cards: bool = Field(description="whether the head set has cards")
    heads: list[HeadCardOut] = Field(description="in the head set's order: weights and explanations use it")


class AuditOut(BaseModel):
    created_at: datetime
    actor: str = Field(description="who: `key:<prefix>` for an API key, `key:env:admin`, or the CLI's --actor")
    action: str
    target: str = Field(description="what it was about: a user's external id, a key prefix, `name@version`")
    details: dict[str, Any]


class ProfileVersionOut(BaseModel):
    head_set: str
    active: bool = Field(description="the head set's active version: the profile the service scores with")
    method: str
    n_pairs: int
    version: int
    created_at: datetime
    updated_at: datetime


class UserHistory(BaseModel):
    user_id: str
    profiles: list[ProfileVersionOut] = Field(description="one per head-set version, latest update first; each "
                                                          "holds its latest weights (earlier ones are not kept)")
    audit: list[AuditOut] = Field(description="audit-log entries about the user, newest first")


class UserPage(BaseModel):
    items: list[UserOut]
    total: int
    offset: int
    limit: int


class WeightsIn(Body):
    weights: list[Weight] = Field(min_length=1, max_length=4096)
    bias: Weight = 0.0
    expected_version: int | None = Field(None, description="refuse (409) if the profile moved past this version")


class HeadSetIn(Body):
    uri: Annotated[str, StringConstraints(min_length=1, max_length=URI_MAX, pattern=NO_NUL)] = Field(
        description="a folder written by HeadSet.save, readable by every replica")
    activate: Flag = False


class HeadSetOut(BaseModel):
    name: str
    version: str
    kind: str
    backbone: str
    dim: int
    num_heads: int
    content_hash: str
    uri: str
    active: bool
    created_at: datetime


class MigrationOut(BaseModel):
    """A profile migration onto a head-set version (`rewardprism models migrate`, run as a Ray actor)."""

    name: str
    version: str
    state: Literal["starting", "running", "done", "failed"]
    users_done: int
    users_total: int | None  # users behind when it started (None until it has counted them)
    pairs: int
    pairs_per_s: float
    eta_s: float | None
    error: str | None
    report: list[str] | None  # the shadow evaluation against the version active when it finished
    regressions: list[str] | None  # why activating would regress (empty: the gate passes)


class KeyCreate(Body):
    scopes: list[Literal["score", "feedback", "admin"]] = Field(min_length=1, max_length=3)
    user_id: UserId | None = Field(None, description="bind the key to this user: it then acts only for them")
    name: Annotated[str, StringConstraints(max_length=NAME_MAX, pattern=NO_NUL)] | None = None


class KeyOut(BaseModel):
    prefix: str = Field(description="the public part of the token, for listings, revocation and the audit log")
    name: str | None
    scopes: list[str]
    user_id: str | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    token: str = Field(description="the whole key, shown this once: only a salted hash of it is stored")


class Error(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    head_set: str | None
    cached_profiles: int
