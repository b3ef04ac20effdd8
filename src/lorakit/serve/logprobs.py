"""Log-probabilities as OpenAI reports them: of each generated token (from the logits the engine samples
from) and of each prompt token (one forward pass over the prompt with the request's own adapter).

    logprob(t_i) = log_softmax(z_i)[t_i],   z_i the logits after t_1 .. t_(i-1)
    top-k        = the k largest entries of log_softmax(z_i)

always of the model's own distribution (before temperature and top_p), as OpenAI and vLLM report them.
The first prompt token has nothing before it: its logprob is null, as in OpenAI's and vLLM's echo.

Two answer shapes: the completions API's legacy one (tokens, token_logprobs, top_logprobs as
{token text: logprob} with the chosen token included, text_offset) and chat's ({"content": [{token,
logprob, bytes, top_logprobs: [...]}]}).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import per_row  # the public name: stable whichever module implements it

CHUNK = 256  # prompt positions turned into log-probabilities at a time
# (token id, its logprob or None for a prompt's first token, top-k [(id, logprob)] or None)
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


def token_logprobs(logits: Tensor, token: int, k: int) -> Entry:
    """One sampled token's entry from the logits (vocab,) it was sampled from."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))


def prompt_logprobs(engine, ids: list[int], adapter: str | None, k: int) -> list[Entry]:
    """Every prompt token's entry: one forward over `ids` with `adapter`, holding the engine's model lock
    (so it runs between two engine steps) and the adapter (so it is not evicted meanwhile)."""
    with engine.lock:
        if adapter is not None:
            engine.adapters.acquire(adapter)
        try:
            with torch.no_grad(), per_row(engine.model, [adapter]):
                logits = engine.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
        finally:
            if adapter is not None:
                engine.adapters.release(adapter)
    entries: list[Entry] = [(ids[0], None, None)]
    for start in range(0, len(ids) - 1, CHUNK):  # in pieces: one float32 copy of positions x vocab at most
        logprobs = torch.log_softmax(logits[start : start + CHUNK].float(), dim=-1)
        following = ids[start + 1 : start + 1 + CHUNK]
        chosen = logprobs.gather(1, torch.tensor(following)[:, None])[:, 0].tolist()
        values, top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        entries += [(t, c, list(zip(i, v))) for t, c, i, v in zip(following, chosen, top.tolist(), values.tolist())]
    return entries


def _names(entries: list[Entry], texts: Callable[[list[int]], list[str]]) -> dict[int, str]:
    ids = sorted({e[0] for e in entries} | {i for e in entries for i, _ in e[2] or ()})
    return dict(zip(ids, texts(ids)))


def completion(entries: list[Entry], texts: Callable[[list[int]], list[str]], start: int = 0) -> dict:
    """The completions API's logprobs object; `texts` turns token ids into their strings.
    top_logprobs maps token text -> logprob (k alternatives and the chosen token; tokens that decode to the
    same text, such as the bytes of one UTF-8 character, share one key, the likeliest's). text_offset:
    where each token starts, counted in token strings (as vLLM) from `start` (a stream's earlier chunks)."""
    names = _names(entries, texts)
    offsets, offset, top = [], start, []
    for token, logprob, alternatives in entries:
        offsets.append(offset)
        offset += len(names[token])
        if logprob is None:
            top.append(None)
            continue
        found = {}
        for i, v in [*alternatives, (token, logprob)]:  # most likely first: a text shared by several
            found.setdefault(names[i], v)  # tokens (parts of one UTF-8 character) keeps the likeliest
        top.append(found)
    return {
        "tokens": [names[e[0]] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat(entries: list[Entry], texts: Callable[[list[int]], list[str]]) -> dict:
    """The chat API's logprobs object (its top_logprobs lists hold exactly k alternatives)."""
    names = _names(entries, texts)

    def item(token: int, logprob: float) -> dict:
        return {"token": names[token], "logprob": logprob, "bytes": list(names[token].encode())}

    content = [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries]
    return {"content": content, "refusal": None}
