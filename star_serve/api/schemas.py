"""Wire types of the HTTP API: OpenAI-compatible requests and responses, and star-serve's own."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

TenantName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _encodable(text: str) -> str:
    """JSON lets a lone UTF-16 surrogate through (`"\\ud800"`); no tokenizer takes one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: {e.reason} at position {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class StreamOptions(BaseModel):
    include_usage: bool = False


TokenId = Annotated[int, Field(ge=0)]
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class _SamplingRequest(BaseModel):
    """The fields completions and chat share. A field this server does not know is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="As vLLM: sample from the k most likely tokens; -1 or 0: all.")
    n: int = Field(1, ge=1, le=128)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="As vLLM: over 1 discourages every token of the prompt and output."
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=1024, description="Token id (a string, as OpenAI) to a bias added to its logit."
    )
    min_tokens: int = Field(0, ge=0, description="As vLLM: tokens generated before end-of-text or a stop can end.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64, description="As vLLM: tokens that end it.")
    return_routing: bool = Field(False, description="Report per-layer expert counts of the request's tokens.")
    ignore_eos: bool = Field(False, description="Generate `max_tokens` tokens even past end-of-text (as vLLM).")

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids; {key[:32]!r} is not one")
        return bias

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        if isinstance(stop, str) and not stop:
            raise ValueError("a stop sequence must not be empty")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        ..., description="A prompt, a list of prompts, a prompt's token ids, or a list of those."
    )
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate per choice; 0 only with `echo`.")
    echo: bool = Field(False, description="Return the prompt before the completion (with `logprobs`, its tokens').")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Log-probability of each token, with this many most likely."
    )
    best_of: int | None = Field(None, ge=1, le=128, description="Generate this many, return the `n` most likely.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt: str | list[Any]) -> str | list[Any]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) and len(prompt) > 64:
            raise ValueError("give between 1 and 64 prompts")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of < info.data.get("n", 1):
            raise ValueError("best_of must be at least n")
        if best_of is not None and best_of > 1 and info.data.get("stream"):
            raise ValueError("best_of cannot be streamed: the best are known only at the end")
        return best_of

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TokenizeRequest(BaseModel):
    """`POST /tokenize`, as vLLM has it: a prompt, or a chat's messages, of one served model."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, min_length=1, description="Without it, the server's one language model.")
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    add_special_tokens: bool = Field(False, description="As the server encodes prompts: none added by default.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, min_length=1, description="Without it, the server's one language model.")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(..., max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """`GET /tokenizer_info`, as vLLM has it: what a client needs to tokenize and render chats as the server
    does (lm-evaluation-harness's remote tokenizer reads it)."""

    model: str
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str = Field(description="Jinja; the plain transcript where the tokenizer has none.")
    model_max_length: int


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="With logprobs: most likely per token.")

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StarInfo(BaseModel):
    """star-serve's part of every inference response."""

    tenant: str
    subspace_version: int
    routing: list[list[list[int]]] | None = Field(
        None, description="Per choice or input: per layer, the number of tokens routed to each expert."
    )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: per token, its text, log-probability (null for a prompt's first
    token), the most likely alternatives, and its character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    star: StarInfo


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    star: StarInfo


class ClassifyRequest(BaseModel):
    model: str = Field(..., min_length=1, max_length=256)
    input: Text | list[Text] = Field(..., description="One text, or a list of texts.")
    return_routing: bool = False

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 256:
            raise ValueError("give between 1 and 256 inputs")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Classification(BaseModel):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]
    usage: ClassifyUsage
    star: StarInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "star-serve"
    task: Literal["generate", "classify"]
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TenantCreate(BaseModel):
    name: TenantName


class Tenant(BaseModel):
    name: str
    created: int
    keys: int


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Tenant]


class KeyInfo(BaseModel):
    id: str
    tenant: str
    created: int


class KeyCreated(KeyInfo):
    key: str = Field(..., description="The API key. It is shown once: only its hash is stored.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


class QualityVerdict(BaseModel):
    """The quality gate's judgement of a candidate on the tenant's held-back prompts; scores are mean
    next-token loss (nats/token) or, for a classifier, predictive entropy. Lower is better."""

    accepted: bool
    held_back_tokens: int
    candidate: float | None = None
    current: float | None = None
    trained: float | None = None
    standard_error: float | None = Field(
        None, description="The standard error of the candidate's score less the better of the other two."
    )
    reason: str = ""
    rolled_back: bool = Field(False, description="The tenant was rolled back to the trained bases on this verdict.")


class LiveLoss(BaseModel):
    """The next-token loss (nats/token) of a sampled share of the tenant's prompts, measured while they were
    served, since `since_version` became the tenant's version; the paired scores are those of the prompts
    also routed with the trained bases (the same tokens both ways). Lower is better."""

    since_version: int
    tokens: int
    served: float | None = None
    paired_tokens: int
    served_paired: float | None = None
    trained_paired: float | None = None
    degraded: bool = Field(False, description="Worse than the trained bases past the window: rolled back.")


class SubspaceState(BaseModel):
    """A tenant's adaptation state for one model."""

    model: str
    tenant: str
    version: int
    tokens_seen: int
    frozen: bool
    learning_rate: float
    last_update: float | None = Field(None, description="Unix time of the last committed version.")
    drift: list[float] = Field(..., description="Per layer: projection distance from the trained basis.")
    orthogonality_defect: list[float] = Field(..., description="Per layer: ||V V^T - I||_F.")
    quality: QualityVerdict | None = Field(
        None, description="The quality gate's last judgement of a candidate version (None: none judged yet)."
    )
    live: LiveLoss | None = Field(None, description="The tenant's live loss on its own traffic (language models).")
    owner: UpdateOwner | None = Field(None, description="Who applies the tenant's updates (its statistics' owner).")


class UpdateOwner(BaseModel):
    partition: int = Field(..., description="The statistics partition the tenant hashes to (CRC-32 mod partitions).")
    replica: str | None = Field(..., description="The replica that holds the partition's lease (host-pid); None: none.")


class SubspacePatch(BaseModel):
    frozen: bool | None = None
    learning_rate: float | None = Field(None, gt=0.0, le=1.0)


class SubspaceRollback(BaseModel):
    version: int = Field(..., ge=0, description="The version to restore (0: the trained bases).")
