"""The request bodies `serve` accepts (pydantic models: the validation and the OpenAPI document) and the error
shape it answers with. Strict, as OpenAI's API is: no "5" for 5, no true for 1, finite numbers only."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictStr, create_model,
                      model_validator)

from ..checks import bounds
from ..generate import GENERATION_RANGES, MAX_NEW_TOKENS, GenerationConfig

GEN = GenerationConfig()  # the defaults shared with `sample`, `chat` and the Python API
MAX_TEXT_CHARS = 100_000  # a prompt, or a conversation in all: far past any context this serves
MAX_PROMPTS = 16  # prompts in one request (and n, the choices per prompt)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 5, vLLM 20)
# OpenAI options this server can't honour: a request may send them at their neutral values only
UNSUPPORTED = ("top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "best_of", "suffix")
UNSUPPORTED_IN_CHAT = ("logprobs",)


def _limit(name: str) -> Any:
    """A request field with GenerationConfig's default and allowed range: one declaration for CLI and API."""
    return Field(getattr(GEN, name), **bounds(GENERATION_RANGES[name]))


def _no_text(value: Any) -> Any:
    if isinstance(value, (str, bool)):  # JSON Schema's integer includes 1.0, but never "1" or true
        raise ValueError("Input should be a valid integer")
    return value


Int = Annotated[int, BeforeValidator(_no_text)]


def _int(**limits: int) -> Any:
    """An integer type within `limits` (ge/le): inside the type, so the OpenAPI document shows them for
    Optional fields too."""
    return Annotated[int, Field(**limits), BeforeValidator(_no_text)]  # (limits first: then they reach the schema)


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
StopText = Annotated[str, Field(max_length=256)]
TokenIds = Annotated[list[_int(ge=0)], Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Options(BaseModel):
    """Sampling options shared by both endpoints; unknown fields (e.g. `user`) are ignored, as OpenAI does.
    Booleans and integers are strict (no "yes" or "5"), numbers finite; ranges are GenerationConfig's."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Optional[Annotated[StrictStr, Field(max_length=256)]] = None
    max_tokens: Optional[_int(ge=0, le=MAX_NEW_TOKENS)] = None
    temperature: StrictFloat = _limit("temperature")
    top_p: StrictFloat = _limit("top_p")
    top_k: Optional[_int(**bounds(GENERATION_RANGES["top_k"]))] = GEN.top_k
    repetition_penalty: StrictFloat = _limit("repetition_penalty")
    stop: Union[StopText, Annotated[list[StopText], Field(max_length=4)], None] = None
    seed: Optional[Int] = Field(None, description="any integer; reduced modulo 2**63 as `sample --seed` does")
    n: _int(ge=1, le=MAX_PROMPTS) = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    top_logprobs: Optional[_int(ge=0, le=0)] = None
    frequency_penalty: Optional[Annotated[StrictFloat, Field(ge=0, le=0)]] = None
    presence_penalty: Optional[Annotated[StrictFloat, Field(ge=0, le=0)]] = None
    logit_bias: Optional[Annotated[dict[str, float], Field(max_length=0)]] = None
    best_of: Optional[_int(ge=1, le=1)] = None

    @model_validator(mode="after")
    def _check_stream(self):
        if self.stream and self.n > 1:
            raise ValueError("stream supports n=1 only")
        return self


class CompletionRequest(Options):
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]] = Field(
        description="text, a list of texts, token ids, or a list of token-id lists")
    echo: StrictBool = Field(False, description="the prompt before the completion (with logprobs: the prompt's "
                                                "token logprobs too, the first one null)")
    logprobs: Optional[_int(ge=0, le=MAX_LOGPROBS)] = Field(
        None, description="the log-probability of each token, and of the `logprobs` most likely tokens at each "
                          "position: log_softmax of the model's raw logits (before temperature, top-k/p and penalty)")
    suffix: Optional[Annotated[str, Field(max_length=0)]] = None

    @model_validator(mode="after")
    def _check(self):
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1 and not isinstance(self.prompt[0], int):
            raise ValueError("stream supports a single prompt only")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, Annotated[list[TextPart], Field(max_length=256)]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Options):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: Optional[_int(ge=0, le=MAX_NEW_TOKENS)] = None  # OpenAI's newer name
    logprobs: Union[Literal[False], None] = None  # chat logprobs are not supported: false or absent only

    @model_validator(mode="after")
    def _check(self):
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's (the server writes the reply)")
        seen_other = False
        for m in self.messages:
            if m.role in ("system", "developer") and seen_other:
                raise ValueError("messages: system messages must come before the conversation")
            seen_other = seen_other or m.role not in ("system", "developer")
        chars = sum(len(m.text()) for m in self.messages)
        if chars > MAX_TEXT_CHARS:
            raise ValueError(f"messages: {chars} characters in all, more than the {MAX_TEXT_CHARS} allowed")
        return self


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx."""

    error: ErrorBody


def with_token_limit(cls: type[Options], limit: int) -> type[Options]:
    """`cls` with max_tokens (and max_completion_tokens) capped at this server's --max-tokens-limit, so the
    OpenAPI document states the real limit."""
    capped = (Optional[_int(ge=0, le=limit)], None)
    fields = {"max_tokens": capped}
    if "max_completion_tokens" in cls.model_fields:
        fields["max_completion_tokens"] = capped
    return create_model(cls.__name__, __base__=cls, **fields)  # type: ignore[call-overload]
