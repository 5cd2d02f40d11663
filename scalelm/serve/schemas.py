"""Request bodies of the OpenAI API (completions, chat completions), with vLLM's sampling extras.

Fields a client sends that are not listed here are ignored (OpenAI clients send a few, e.g.
``user``); out-of-range values are a 400 in OpenAI's error shape (see ``app.py``). Types are
strict, as OpenAI's are: ``"5"`` or ``true`` is not an integer and ``"yes"`` not a boolean (a
coerced value would be a setting the client did not mean); numbers accept integers, and integers
accept integral numbers (``5.0``: JSON does not tell them apart). Responses are plain dicts in
OpenAI's shape, built in ``app.py``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_N = 128  # choices per prompt (OpenAI's limit)
MAX_STOPS = 16
MAX_LOGPROBS = 20
SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed accepts
STRICT = ConfigDict(extra="ignore", strict=True)


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SteerRequest(BaseModel):
    """scalelm's extension: steer this request with a vector added to the residual stream (see
    docs/interpretability.md). Applies to every choice of the request."""
    model_config = STRICT
    vector: Union[str, list[float]] = Field(..., description="the name of a vector the server loaded "
                                            "(`scalelm serve --steer-vector NAME=FILE`), or the numbers themselves "
                                            "(n_embd of them)")
    layer: Optional[Int] = Field(None, ge=0, description="the layer whose input stream it is added to; default: the "
                                 "named vector's own (required with numbers)")
    scale: float = Field(1.0, ge=-1e4, le=1e4, allow_inf_nan=False, description="the vector's multiplier")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema", description="the JSON schema the reply validates against "
                                    "(omitted: any JSON)")
    strict: Optional[bool] = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``."""
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingFields(BaseModel):
    """Fields shared by both endpoints."""
    model_config = STRICT

    model: Optional[str] = Field(None, description="the served model's name (see /v1/models); "
                                 "omitted = the served model")
    max_tokens: Optional[Int] = Field(None, ge=0, description="tokens to generate at most; prompt + "
                                      "max_tokens must fit the context")
    temperature: float = Field(1.0, ge=0.0, le=1e6, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: Optional[Union[str, list[str]]] = Field(None, description=f"up to {MAX_STOPS} stop strings")
    seed: Optional[Int] = Field(None, **SEED_RANGE)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id -> bias in [-100, 100]")
    # vLLM's extras
    top_k: Int = Field(-1, ge=-1, description="-1 or 0 = off")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0, description="> 1 discourages repeats (HF's)")
    no_repeat_ngram_size: Int = Field(0, ge=0, le=1024, description="never repeat an n-gram of prompt + output "
                                      "(HF's); 0 = off")
    min_tokens: Int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[Int]] = Field(None, max_length=MAX_STOPS)
    truncate_prompt_tokens: Optional[Int] = Field(None, ge=1, description="keep only the last N tokens of "
                                                  "a longer prompt (N at most the context)")
    # structured output (docs/serving.md): OpenAI's, and vLLM's guided decoding (at most one of them)
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[dict, str]] = Field(None, description="a JSON schema (object or its JSON text) the "
                                                    "output validates against")
    guided_regex: Optional[str] = Field(None, description="a regular expression the whole output matches")
    guided_choice: Optional[list[str]] = Field(None, min_length=1, max_length=1024,
                                               description="the output is exactly one of these strings")
    # scalelm's extension
    steer: Optional[SteerRequest] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[Int], list[list[Int]]] = Field(
        ..., description="a text, a list of texts, token ids, or a list of token-id lists")
    echo: bool = Field(False, description="return the prompt before the completion (with max_tokens=0 "
                       "and logprobs: the prompt tokens' logprobs)")
    logprobs: Optional[Int] = Field(None, ge=0, le=MAX_LOGPROBS, description="the k most likely tokens "
                                    "at each position, with the chosen token's logprob")


class ContentPart(BaseModel):
    model_config = STRICT
    type: str
    text: Optional[str] = None


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str
    arguments: str = Field(..., description="the arguments as a JSON object's text")


class ToolCall(BaseModel):
    """A call an assistant message made (sent back in the conversation)."""
    model_config = STRICT
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, max_length=128, description="an assistant message's calls")
    tool_call_id: Optional[str] = Field(None, description="a tool message: the call it answers")


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's function names


class FunctionDef(BaseModel):
    model_config = STRICT
    name: str = Field(..., pattern=TOOL_NAME)
    description: Optional[str] = None
    parameters: Optional[dict] = Field(None, description="a JSON schema of the arguments (omitted: no arguments)")
    strict: Optional[bool] = Field(None, description="accepted; the schema is always enforced")


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[Int] = Field(None, ge=0, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: Optional[Int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(
        None, description="none, auto (the default with tools), required, or a named function")
    parallel_tool_calls: bool = Field(True, description="several calls in one reply (at most 8); false: one")
