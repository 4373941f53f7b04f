"""HTTP request/response schemas (pydantic v2); they are the OpenAPI page's documentation.

Requests are validated strictly: a field the schema calls an integer or a boolean takes a JSON
integer (`3` or `3.0`) or boolean, not a string that looks like one (`"stream": "yes"` is a
422), so the server accepts what `/openapi.json` says. What the schema cannot say (a text's
length in tokens against the model's) is a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

# The largest integer a JSON number carries exactly everywhere (2^53 - 1).
SEED_MAX = 2**53 - 1
# /v1/completions without `seed` and with greedy decoding (temperature 0 or absent): the same
# prompt gives the same text every time; `n` candidates use seeds 0, 1, ...
OPENAI_GREEDY_SEED = 0


def _integral(v: object) -> object:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def Int(ge: int | None = None, le: int | None = None) -> Any:
    """An integer field's type: JSON Schema's integers include 3.0, taken as 3 (strict mode
    alone would refuse it); the bounds sit before the conversion so /openapi.json shows them
    as `minimum` / `maximum`."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


INFILL_PLACEHOLDER = r"\[MASK(:[0-9]+)?\]"  # somewhere in the text
NOT_BLANK = r"\S"  # at least one character that is not a space
# Readable 422 messages for these patterns (the rule, not the regex)
PATTERN_MEANS = {
    INFILL_PLACEHOLDER: "infill text has no [MASK] placeholder (write [MASK] or [MASK:n])",
    NOT_BLANK: "must not be empty or blank",
}
Label = Annotated[str, Field(min_length=1, max_length=1000, pattern=NOT_BLANK)]
Labels = Annotated[
    list[Label], Field(min_length=1, max_length=64, json_schema_extra={"uniqueItems": True})
]


class GenerationOptions(BaseModel):
    """Fields every YAN endpoint accepts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: Int(1) | None = Field(
        None,
        description="Euler time points T on [0, 1]; T - 1 Euler steps (trunk passes) are "
        "taken. 1..the server's --max-steps. Default: --default-steps, else the checkpoint's "
        "setting (3 for the shipped model).",
        examples=[3],
    )
    seed: Int(0, SEED_MAX) | None = Field(
        None,
        description="Seed of this request's own noise; the same seed gives the same output "
        "whatever else is batched with it. Default: random.",
        examples=[0],
    )
    routing: Literal["sample", "argmax"] = Field(
        "argmax",
        description="How each token's expert is frozen at t=0: the gate's mode or a draw.",
    )
    n: Int(1, 16) = Field(
        1,
        description="Candidates to generate (seeds seed, seed+1, ...), best first by mean "
        "decoder confidence.",
    )
    return_confidence: bool = Field(False, description="Include per-token decoder probabilities.")
    stream: bool = Field(
        False,
        description="Server-sent events: the decoded text at each Euler time point (0: the "
        "initial noise), then the result.",
    )


class InfillRequest(GenerationOptions):
    text: str = Field(
        ...,
        max_length=100_000,
        pattern=INFILL_PLACEHOLDER,
        description="Text with [MASK] placeholders; [MASK:n] sets a span's token budget.",
        examples=["In the beginning God created the [MASK] and the earth."],
    )
    span_tokens: Int(1, 64) = Field(2, description="Token budget of a bare [MASK] placeholder.")
    protocol: Literal["fim", "full"] = Field(
        "fim",
        description="AR baseline checkpoints only (YAN ignores it): `fim` generates only the "
        "spans, `full` regenerates the whole passage (the paper's protocol).",
    )
    ignore_eos: bool = Field(
        False,
        description="Benchmarking: an AR checkpoint decodes its whole budget (the passage for "
        "`full`, every span's budget for `fim`) instead of stopping at EOS; YAN always computes "
        "every position.",
    )
    allow_empty: bool = Field(
        False,
        description="YAN: let a span come back empty. By default each [MASK] gets at least one "
        "word token (where the model would leave the gap empty, its most likely word, with the "
        "low confidence the model gives it).",
    )


class CompleteRequest(GenerationOptions):
    prompt: str = Field(
        ...,
        max_length=100_000,
        pattern=NOT_BLANK,
        examples=["And God said, Let there be light: and there was"],
    )
    max_tokens: Int(1, 4096) = Field(16, description="Most tokens to generate.")
    ignore_eos: bool = Field(
        False,
        description="Benchmarking: return all max_tokens positions instead of stopping at EOS "
        "(an AR model keeps decoding; YAN always computes every position).",
    )


class QARequest(GenerationOptions):
    context: str = Field(
        ...,
        max_length=100_000,
        examples=["Mary moved to the bathroom. John went to the hallway."],
    )
    question: str = Field(..., max_length=10_000, pattern=NOT_BLANK, examples=["Where is Mary?"])
    max_tokens: Int(1, 4096) = Field(8, description="Most answer tokens.")


class ClassifyRequest(GenerationOptions):
    text: str = Field(
        ...,
        max_length=100_000,
        pattern=NOT_BLANK,
        examples=["Blessed are the poor in spirit: for theirs is the kingdom of heaven."],
    )
    labels: Labels | None = Field(
        None,
        description="Candidate labels, all different (after trimming spaces and mapping "
        "checkpoint label names to their ids): each is scored and the best returned. Without "
        "them the label is generated.",
        examples=[["law", "gospels/acts", "epistles"]],
    )
    max_tokens: Int(1, 64) = Field(6, description="Most label tokens (generated label).")


class Timing(BaseModel):
    queue_ms: float = Field(..., description="Time waiting for a batch.")
    compute_ms: float = Field(..., description="Time of the batch that served the request.")
    total_ms: float


class Usage(BaseModel):
    prompt_tokens: int = Field(
        ...,
        description="Source positions the model read: the text's tokens with the task's "
        "template, masks and EOS (/v1/completions counts the user's prompt alone).",
    )
    completion_tokens: int = Field(
        ...,
        description="Tokens the best candidate wrote: up to EOS, an infill's content tokens "
        "(padding left in a span not counted).",
    )
    total_tokens: int


class Candidate(BaseModel):
    text: str
    confidence: float = Field(..., description="Mean decoder probability of the output tokens.")
    token_confidence: list[float] | None = None
    finish_reason: Literal["stop", "length"] | None = None
    fills: list[str] | None = Field(None, description="Infill: the text of each span.")
    fill_confidence: list[float] | None = Field(
        None,
        description="Infill: each span's confidence, the mean decoder probability of its own "
        "word tokens (0 for an empty span); `confidence` is their mean.",
    )
    _n_tokens: int = PrivateAttr(0)  # output tokens, for usage accounting


class GenerationResponse(BaseModel):
    id: str
    model: str
    task: str
    text: str = Field(..., description="The best candidate's output.")
    candidates: list[Candidate]
    steps: int = Field(..., description="The Euler time points T used (T - 1 Euler steps).")
    usage: Usage
    timing: Timing


class InfillResponse(GenerationResponse):
    fills: list[str] = Field(..., description="The best candidate's fill for each placeholder.")


class CompleteResponse(GenerationResponse):
    finish_reason: Literal["stop", "length"]


class QAResponse(GenerationResponse):
    answer: str


class LabelScore(BaseModel):
    label: str
    score: float = Field(..., description="Probability among the candidates.")
    logprob: float = Field(
        ...,
        description="Decoder log-probability of the label's target after the answer header, "
        "all candidates EOS-padded to one length (so they share one latent).",
    )


class ClassifyResponse(GenerationResponse):
    label: str
    label_id: int | None = None
    scores: list[LabelScore] | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int | str | None = Field(
        ...,
        description="The HTTP status; on /v1/completions OpenAI's string code where one applies "
        "(`model_not_found`, `context_length_exceeded`).",
    )
    param: str | None = Field(
        None, description="/v1/completions only (OpenAI's shape): the request field at fault."
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "yan-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------- OpenAI-compatible /v1/completions
TokenIds = Annotated[list[Int(ge=0)], Field(min_length=1, max_length=100_000)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = Field(
        False, description="Send a last chunk with `choices: []` and `usage` before `[DONE]`."
    )


class OpenAICompletionRequest(BaseModel):
    """The subset of OpenAI's completions API that maps onto YAN completion (and, with `suffix`,
    infilling). Unknown fields are accepted and ignored, as OpenAI clients send extra ones.
    `echo: true` with a `suffix` is refused, as OpenAI does (the schema says so with `not`)."""

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra={
            "not": {
                "required": ["echo", "suffix"],
                "properties": {"echo": {"const": True}, "suffix": {"type": "string"}},
            }
        },
    )

    model: str | None = Field(
        None, description="The served model's id (GET /v1/models); another id is a 404."
    )
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        ...,
        description="A string, a list of strings, a list of token ids, or a list of such lists.",
        examples=["And God said, Let there be"],
    )
    suffix: str | None = Field(
        None,
        max_length=100_000,
        description="Infilling: the text after the gap. The model fills `max_tokens` positions "
        "between prompt and suffix; `text` is the fill.",
    )
    max_tokens: Int(0, 4096) | None = Field(
        16, description="Most tokens to generate (0: none, e.g. with `echo`)."
    )
    temperature: float | None = Field(
        None,
        ge=0,
        le=2,
        description="0 or absent: greedy, and without `seed` the fixed seed 0 (deterministic).",
    )
    top_p: float | None = Field(
        None,
        ge=1,
        le=1,
        description="Only 1 (nucleus sampling is not supported; use temperature).",
    )
    n: Int(1, 16) = 1
    seed: Int(0, SEED_MAX) | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Return the prompt before the completion.")
    logprobs: Int(0, 5) | None = Field(
        None,
        description="Log-probabilities of the returned tokens; with `echo`, of every prompt "
        "token too (the first is null). `top_logprobs` holds the k most likely tokens.",
    )


class OpenAILogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class OpenAIChoice(BaseModel):
    text: str
    index: int
    logprobs: OpenAILogprobs | None = None
    finish_reason: Literal["stop", "length"]


class OpenAICompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: Usage
