"""OpenAI's completions and chat-completions API as plain dicts: parsing requests (every problem a
clear 400) and the response, stream-chunk and error shapes the official `openai` client expects.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..errors import LorakitError
from .limits import Limits, flag
from .sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI fields lorakit does not implement -> the values that mean "not used", which are accepted
UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
}


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}  # extra HTTP headers of the answer (Allow: for a 405)

    def body(self) -> dict:
        kind = "invalid_request_error" if 400 <= self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """A parsed request: which model, what to generate from, how to sample, how to answer."""

    model: str
    prompts: list  # completions: strings or token-id lists; chat: one list of messages
    chat: bool
    sampling: dict  # SamplingParams fields; max_tokens may be None (= the rest of the context)
    stream: bool
    include_usage: bool
    n: int = 1  # choices per prompt
    echo: bool = False  # completions: the prompt starts each choice's text (and its logprobs)
    logprobs: int | None = None  # top alternatives per token; None: no logprobs at all


def _field(body: dict, name: str, kinds: tuple, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return default
    value = body[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        allowed = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {allowed}, got {type(value).__name__}", param=name)
    return value


def _common(body: dict, chat: bool, limits: Limits) -> dict:
    """The fields both APIs share, checked: the Job's keyword arguments but for prompts."""
    model = _field(body, "model", (str,), required=True)
    for name, fine in UNSUPPORTED.items():
        value = body.get(name)
        if not any(type(value) is type(f) and value == f for f in fine):  # strict: true is not 1
            raise ApiError(400, f"'{name}' is not supported by lorakit serve; leave it out", param=name)
    max_tokens = _field(body, "max_tokens", (int,))
    if chat:  # the newer name; both are checked, max_tokens wins
        completion_tokens = _field(body, "max_completion_tokens", (int,))
        max_tokens = completion_tokens if max_tokens is None else max_tokens
    if not chat and max_tokens is None:
        max_tokens = 16  # OpenAI's default for completions
    n, echo, logprobs = _choices(body, chat, limits)
    sampling = {
        "max_tokens": max_tokens,
        "temperature": _field(body, "temperature", (int, float), 1.0),
        "top_p": _field(body, "top_p", (int, float), 1.0),
        "stop": _field(body, "stop", (str, list), []),
        "seed": _field(body, "seed", (int,)),
        "logprobs": logprobs,
    }
    if max_tokens is not None and max_tokens < 0:
        raise ApiError(400, f"max_tokens={max_tokens} is invalid: use an integer >= 0", param="max_tokens")
    try:  # validate now (with a stand-in max_tokens: 0 means no generation, None depends on the prompt)
        SamplingParams(**{**sampling, "max_tokens": sampling["max_tokens"] or 1})
    except LorakitError as err:
        raise ApiError(400, str(err), param=str(err).split("=")[0]) from None
    stream = _field(body, "stream", (bool,), False)
    if stream and n > 1:
        raise ApiError(400, "n > 1 needs stream: false (a stream carries one choice)", param="n")
    options = _field(body, "stream_options", (dict,), {})
    usage = _field(options, "include_usage", (bool,), False)
    return dict(model=model, sampling=sampling, stream=stream, include_usage=usage, n=n, echo=echo, logprobs=logprobs)


def _choices(body: dict, chat: bool, limits: Limits) -> tuple[int, bool, int | None]:
    """n, echo and logprobs (completions: an int k; chat: logprobs true + top_logprobs k)."""
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= limits.max_prompts:
        raise ApiError(400, f"n={n} is invalid: use 1 to {limits.max_prompts} ({flag('max_prompts')})", param="n")
    echo = _field(body, "echo", (bool,), False)
    if chat:
        if echo:
            raise ApiError(400, "echo is a completions option; chat answers never repeat the messages", param="echo")
        top = _field(body, "top_logprobs", (int,))
        if _field(body, "logprobs", (bool,), False):
            logprobs, name = top or 0, "top_logprobs"
        elif top is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        else:
            logprobs = None
    else:
        logprobs, name = _field(body, "logprobs", (int,)), "logprobs"
    if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
        raise ApiError(
            400, f"{name}={logprobs} is invalid: use 0 to {limits.max_logprobs} ({flag('max_logprobs')})", param=name
        )
    return n, echo, logprobs


def parse_completion(body: dict, limits: Limits) -> Job:
    common = _common(body, False, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt)
    ):
        prompts = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a non-empty string, a list of strings, or token ids", param="prompt")
    if common["stream"] and len(prompts) > 1:
        raise ApiError(400, "streaming takes one prompt per request", param="prompt")
    if len(prompts) * common["n"] > limits.max_prompts:
        raise ApiError(
            400,
            f"{len(prompts)} prompts x n={common['n']} generations in one request; this server takes at most "
            f"{limits.max_prompts} ({flag('max_prompts')}): split them over several requests",
            param="prompt",
        )
    return Job(prompts=prompts, chat=False, **common)


def parse_chat(body: dict, limits: Limits) -> Job:
    common = _common(body, True, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a 'role' of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(
                    400, f"messages[{i}].content parts must all be text parts", param=f"messages[{i}].content"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        clean.append({"role": message["role"], "content": content})
    return Job(prompts=[clean], chat=True, **common)


# ----- responses --------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(job: Job, rid: str, choices: list[tuple], prompt_tokens: int, completion_tokens: int) -> dict:
    """The whole answer; `choices` is [(text, finish_reason, logprobs object or None)], in index order."""
    if job.chat:
        items = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason}
            for i, (text, reason, lp) in enumerate(choices)
        ]
    else:
        items = [
            {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
            for i, (text, reason, lp) in enumerate(choices)
        ]
    return {
        "id": rid,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": items,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    job: Job,
    rid: str,
    text: str | None,
    finish_reason: str | None = None,
    first: bool = False,
    logprobs: dict | None = None,
) -> dict:
    """One server-sent event of a stream (text None: no choice, e.g. the usage-only last chunk);
    `logprobs`: those of the tokens since the previous chunk."""
    if job.chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        kind = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
        kind = "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": job.model,
        "choices": choices if text is not None or finish_reason is not None else [],
    }
