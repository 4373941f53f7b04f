"""HTTP request/response schemas (pydantic v2); they are the OpenAPI page's documentation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

SEED_MAX = 2**63 - 1


class GenerationOptions(BaseModel):
    """Fields every YAN endpoint accepts."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(
        None,
        description="Euler time points T (T - 1 trunk passes); 1..the server's --max-steps. "
        "Default: the checkpoint's setting (3 for the shipped model).",
        examples=[3],
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Seed of this request's own noise; the same seed gives the same output "
        "whatever else is batched with it. Default: random.",
        examples=[0],
    )
    routing: Literal["sample", "argmax"] = Field(
        "argmax",
        description="How each token's expert is frozen at t=0: the gate's mode or a draw.",
    )
    n: int = Field(
        1,
        ge=1,
        le=16,
        description="Candidates to generate (seeds seed, seed+1, ...), best first by mean "
        "decoder confidence.",
    )
    return_confidence: bool = Field(False, description="Include per-token decoder probabilities.")
    stream: bool = Field(
        False,
        description="Server-sent events: the decoded text after each Euler step, then the result.",
    )


class InfillRequest(GenerationOptions):
    text: str = Field(
        ...,
        max_length=100_000,
        description="Text with [MASK] placeholders; [MASK:n] sets a span's token budget.",
        examples=["In the beginning God created the [MASK] and the earth."],
    )
    span_tokens: int = Field(
        2, ge=1, le=64, description="Token budget of a bare [MASK] placeholder."
    )
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


class CompleteRequest(GenerationOptions):
    prompt: str = Field(
        ...,
        max_length=100_000,
        examples=["And God said, Let there be light: and there was"],
    )
    max_tokens: int = Field(16, ge=1, le=4096, description="Most tokens to generate.")
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
    question: str = Field(..., max_length=10_000, examples=["Where is Mary?"])
    max_tokens: int = Field(8, ge=1, le=4096, description="Most answer tokens.")


class ClassifyRequest(GenerationOptions):
    text: str = Field(
        ...,
        max_length=100_000,
        examples=["Blessed are the poor in spirit: for theirs is the kingdom of heaven."],
    )
    labels: list[str] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Candidate labels: each is scored and the best returned. Without them the "
        "label is generated.",
        examples=[["law", "gospels/acts", "epistles"]],
    )
    max_tokens: int = Field(6, ge=1, le=64, description="Most label tokens (generated label).")


class Timing(BaseModel):
    queue_ms: float = Field(..., description="Time waiting for a batch.")
    compute_ms: float = Field(..., description="Time of the batch that served the request.")
    total_ms: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Candidate(BaseModel):
    text: str
    confidence: float = Field(..., description="Mean decoder probability of the output tokens.")
    token_confidence: list[float] | None = None
    finish_reason: Literal["stop", "length"] | None = None
    fills: list[str] | None = Field(None, description="Infill: the text of each span.")
    _n_tokens: int = PrivateAttr(0)  # output tokens, for usage accounting


class GenerationResponse(BaseModel):
    id: str
    model: str
    task: str
    text: str = Field(..., description="The best candidate's output.")
    candidates: list[Candidate]
    steps: int
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
    code: int


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
class OpenAICompletionRequest(BaseModel):
    """The subset of OpenAI's completions API that maps onto YAN completion. Unknown fields are
    accepted and ignored, as OpenAI clients send extra ones."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[str] = Field(..., examples=["And God said, Let there be"])
    max_tokens: int | None = Field(16, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    echo: bool = False


class OpenAIChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class OpenAICompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: Usage
