"""The wire format: OpenAI's request and response bodies, the error body, and the
server's own /health, /ready and /info answers. /openapi.json is generated from these.

Unknown request fields are ignored, as OpenAI-compatible servers do; known fields this
server cannot honour (n > 1, logprobs, tools, penalties) are refused rather than
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(description="the request field at fault, when one is")
    code: int | None = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every error answer."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answered in OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> ErrorResponse:
        return error_response(self.message, self.type, self.param, self.status)


def error_response(message: str, type_: str, param: str | None, code: int) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# What this server cannot honour is refused, and the schema says so (an OpenAPI client
# or a fuzzer learns it from /openapi.json, not from a 400).


def not_supported() -> Any:
    return Field(None, description="not supported by this server: leave it out")


StopString = Annotated[str, Field(min_length=1)]


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Lenient):
    include_usage: bool = False


class TextFormat(Lenient):
    type: Literal["text"]


class JsonObjectFormat(Lenient):
    """Any JSON object."""

    type: Literal["json_object"]


class JsonSchema(Lenient):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # `schema` is a BaseModel method name, hence the alias.
    json_schema: dict[str, Any] = Field(
        alias="schema", description="the JSON Schema the answer follows (llguidance's subset)"
    )
    strict: bool | None = Field(None, description="always enforced by this server")


class JsonSchemaFormat(Lenient):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class SamplingRequest(Lenient):
    model: str = Field(min_length=1, description="a served name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="capped by the server's limit")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(None, description="the same seed gives the same answer")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="read only with stream")
    n: Literal[1] | None = Field(None, description="one answer per request")
    presence_penalty: Literal[0] | None = not_supported()
    frequency_penalty: Literal[0] | None = not_supported()
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        None, description="constrain the answer to JSON, or to a JSON Schema"
    )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = not_supported()
    tools: list[Any] | None = Field(None, max_length=0, description="not supported")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="text, token ids, or a list of one text")
    echo: Literal[False] | None = not_supported()
    logprobs: Literal[0] | None = not_supported()
    suffix: Literal[""] | None = not_supported()

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, str):
            return prompt
        first = prompt[0]
        if isinstance(first, str):
            return first  # a list of one text (the schema allows no more)
        return [int(token) for token in prompt]


# ---------------------------------------------------------------------------- answers
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class RoleDelta(BaseModel):
    """The first event of a chat stream."""

    role: Literal["assistant"] = "assistant"
    content: Literal[""] = ""


class TextDelta(BaseModel):
    content: str


class EndDelta(BaseModel):
    """The event with the finish reason carries no text."""


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: RoleDelta | TextDelta | EndDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`data: <this JSON>`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="only in the last chunk, with include_usage")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A text completion, whole; streamed, each event has this shape with a part of the
    text, `finish_reason` null until the last one, and `usage` only with include_usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="the weights' folder or hub id; an adapter's folder")
    parent: str | None = Field(description="for an adapter: the served name of its base")
    max_model_len: int | None = Field(description="context window in tokens; null while loading")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "error"]
    error: str | None = None


class Readiness(BaseModel):
    ready: bool
    models: list[str] | None = Field(None, description="when ready: the served names")
    phase: str | None = Field(None, description="when not ready: loading phase, or draining")


class ServedModelInfo(BaseModel):
    """One served model, as GET /info reports it."""

    id: str = Field(description="the name requests use in `model`")
    source: str = Field(description="where its weights (or the adapter) were loaded from")
    parent: str | None = Field(description="for an adapter: the served name of its base model")
    tokenizer: str = Field(description="where its tokenizer was loaded from")
    max_model_len: int = Field(description="context window in tokens, prompt and answer")
    attention: str = Field(description="the attention implementation it runs, e.g. paged|sdpa")
    cuda_graphs: bool = Field(description="steps replayed from captured CUDA graphs")
    async_batching: bool = Field(description="next batch prepared while this one computes")
    decode_fast_path: bool = Field(description="decode reads the KV cache by block table")


class ServerInfo(BaseModel):
    """What the server runs on, so a client (the cost meter) reads it instead of guessing."""

    engine: Literal["transformers-continuous-batching"]
    engine_version: str = Field(description="the transformers version")
    device: str = Field(description="torch device of the weights, e.g. cpu or cuda:0")
    device_name: str = Field(description="GPU or CPU model name")
    dtype: str = Field(description="compute precision, e.g. float32 or bfloat16")
    models: list[ServedModelInfo]
