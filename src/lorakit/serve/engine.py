"""Continuous batching: one base model, many adapters, one decode step for all running requests.

A background thread repeats:
  1. admit waiting requests (up to `max_batch` rows and `max_prefill_tokens` per pass): prefill
     them together, left-padded, each row with its own adapter (lorakit.per_row); sample each
     one's first token; splice their KV cache into the running batch's
  2. one decode step for every running row: its last token, its adapter, its own position
  3. drop finished rows (max_tokens, end-of-sequence, cancelled) from the batch and the cache
so new requests join between decode steps instead of waiting for the batch to drain.

The KV cache (kv_cache.StaticKV) is preallocated and holds rows of different lengths, left-padded
to a common length with a mask over the real positions; position ids count each row's real tokens
only, so every row computes what it would compute alone (up to float rounding in the batched
matmuls). Columns that are padding in every row are trimmed as rows leave. Decode steps of
Llama-family models run decode_step's lean forward; prefills and other models the model's forward.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..model_state import require_adapter
from ..per_row import per_row
from .adapter_cache import AdapterCache
from .decode_step import decode_step, lean_layers, module_steps, shared_steps
from .kv_cache import StaticKV
from .logprobs import token_logprobs
from .sampling import SamplingParams, sample_rows

log = logging.getLogger("lorakit.serve")


class ContextTooLong(LorakitError):
    """Prompt plus max_tokens exceed the model's context (HTTP 400, context_length_exceeded)."""


class EngineStopped(LorakitError):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)
class Request:
    """One generation. The engine puts ("token", id) (after ("logprobs", (id, logprob, top)) when
    params.logprobs is set), then ("done", reason) or ("error", message)."""

    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (e.g. a stop string was found or the client left); takes effect next step."""
        self.cancelled.set()

    def __iter__(self):
        """Yields ("token", id) events (each after its ("logprobs", ...) when asked for), then one final
        ("done", reason) or ("error", message)."""
        while True:
            kind, value = self.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return


@dataclass(eq=False)
class _Row:
    request: Request
    generator: torch.Generator | None
    length: int = 0  # real tokens in the KV cache
    last: int = 0  # the token to feed next
    produced: int = 0
    finished: str | None = None


def context_length(model: nn.Module) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise LorakitError(
        f"cannot tell the context length of {type(model).__name__}: its config has no max_position_embeddings"
    )


class Engine:
    """Runs requests for `model` (a causal LM) and the adapters in `adapters`, batched together."""

    def __init__(
        self,
        model: nn.Module,
        adapters: AdapterCache | None = None,
        *,
        max_batch: int = 32,
        max_prefill_tokens: int = 2048,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        pad_token_id: int = 0,
        max_waiting: int = 4096,
    ):
        for name, value in (
            ("max_batch", max_batch),
            ("max_prefill_tokens", max_prefill_tokens),
            ("max_waiting", max_waiting),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorakitError(f"{name}={value!r} is invalid: use an integer >= 1")
        self.model = model.eval()
        self.adapters = adapters
        self.lock = adapters.lock if adapters is not None else threading.RLock()
        self.max_batch, self.max_prefill_tokens, self.max_waiting = max_batch, max_prefill_tokens, max_waiting
        self.eos = set(int(t) for t in eos_token_ids if t is not None)
        self.pad = int(pad_token_id)
        self.context = context_length(model)
        self.vocab = (
            model.get_output_embeddings().weight.shape[0]
            if model.get_output_embeddings() is not None
            else model.config.vocab_size
        )
        self._keep_last = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )
        self.device = next(model.parameters()).device
        self.lean = lean_layers(model)  # None: decode through the model's forward
        self.waiting: deque[Request] = deque()
        self.rows: list[_Row] = []
        self.cache: StaticKV | None = None
        self.stats = {"requests": 0, "tokens": 0, "decode_steps": 0, "prefills": 0, "max_rows": 0}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._check_cache_layout()

    # ----- public ----------------------------------------------------------------------------
    def check(self, prompt: list[int], max_tokens: int) -> None:
        """Refuse a prompt this model cannot run (LorakitError, ContextTooLong) before anything is queued."""
        if not prompt:
            raise LorakitError("the prompt is empty; send at least one token of text")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab for t in prompt):
            raise LorakitError(f"prompt token ids must be integers from 0 to {self.vocab - 1}")
        if len(prompt) + max_tokens > self.context:
            raise ContextTooLong(
                f"this model's maximum context length is {self.context} tokens, but {len(prompt) + max_tokens} "
                "were "
                f"requested ({len(prompt)} in the prompt, {max_tokens} in max_tokens); shorten the prompt or "
                "lower max_tokens"
            )

    def submit(self, prompt: list[int], adapter: str | None, params: SamplingParams) -> Request:
        """Queue a request; raises LorakitError (bad input) before anything is queued."""
        self.check(prompt, params.max_tokens)
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        if adapter is not None:
            if self.adapters is None:
                require_adapter(self.model, adapter)  # one already on the model (lorakit generate)
            else:
                self.adapters.acquire(adapter)  # loads it if needed; held until the request is done
        request = Request(list(prompt), adapter, params)
        with self._cv:
            full = len(self.waiting) >= self.max_waiting
            if not full:
                self.waiting.append(request)
                self._cv.notify()
        if full:  # released outside the condition: the engine takes the model lock first, then it
            self._release(request)
            raise EngineStopped(f"{self.max_waiting} requests are already waiting; retry later")
        return request

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def step(self) -> bool:
        """One iteration (admit + prefill, one decode step, drop finished rows); False when idle."""
        with self.lock:
            self._drop()  # requests cancelled since the last step
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
                self._drop()
            if not self.rows:
                return bool(admitted)
            self._decode()
            self._drop()
            return True

    # ----- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.waiting and not self.rows:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as err:  # a failed step fails its requests, never the server
                log.exception("generation step failed")
                self._fail_all(f"generation failed: {type(err).__name__}: {err}")
        self._fail_all("the server is shutting down")

    def _admit(self) -> list[_Row]:
        admitted: list[_Row] = []
        with self._cv:
            longest = 0
            while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                request = self.waiting[0]
                if request.cancelled.is_set():
                    self.waiting.popleft()
                    self._finish_request(request, "cancelled")
                    continue
                longest_if = max(longest, len(request.prompt))
                if admitted and longest_if * (len(admitted) + 1) > self.max_prefill_tokens:
                    break  # the rest joins at the next step
                longest = longest_if
                self.waiting.popleft()
                admitted.append(_Row(request, request.params.generator()))
        return admitted

    @property
    def mask(self) -> Tensor | None:
        """The running rows' attention mask over the cached columns (None when idle)."""
        return None if self.cache is None else self.cache.window

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache, adapters: list[str | None]):
        from transformers import DynamicCache

        with torch.no_grad(), per_row(self.model, adapters):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache if cache is not None else DynamicCache(),
                use_cache=True,
                **self._keep_last,
            )
        return out.logits[:, -1], out.past_key_values

    def _prefill(self, new: list[_Row]) -> None:
        longest = max(len(r.request.prompt) for r in new)
        ids = torch.full((len(new), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(new), longest), dtype=torch.long)
        for i, row in enumerate(new):
            prompt = row.request.prompt
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            mask[i, longest - len(prompt) :] = 1
            row.length = len(prompt)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None, [r.request.adapter for r in new])
        if self.cache is None:
            self.cache = StaticKV(len(cache.layers))
        room = max(r.request.params.max_tokens for r in self.rows + new)  # columns the batch may still write
        self.cache.add_rows([c.keys for c in cache.layers], [c.values for c in cache.layers], mask, room)
        self.rows.extend(new)
        self.stats["prefills"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.rows))
        self._accept(new, logits)

    def _decode(self) -> None:
        ids = torch.tensor([[r.last] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)
        padded = self.cache.padded
        mask = self.cache.open_column()
        adapters = [r.request.adapter for r in self.rows]
        if self.lean is not None:
            mask = mask if padded else None
            with torch.no_grad():
                # one adapter (or none) for every row: no per-row routing at all (decode_step.shared_steps)
                steps = shared_steps(self.model, self.lean, adapters[0]) if len(set(adapters)) == 1 else None
                if steps is not None:
                    logits = decode_step(self.model, steps, ids, positions, self.cache, mask)
                else:
                    with per_row(self.model, adapters):
                        logits = decode_step(self.model, module_steps(self.lean), ids, positions, self.cache, mask)
        else:
            logits, _ = self._forward(ids, mask, positions, self.cache, adapters)
            self.cache.advance()
        for row in self.rows:
            row.length += 1
        self.stats["decode_steps"] += 1
        self._accept(self.rows, logits)

    def _accept(self, rows: list[_Row], logits: Tensor) -> None:
        tokens = sample_rows(logits, [r.request.params for r in rows], [r.generator for r in rows])
        self._put_logprobs(rows, logits, tokens)
        for row, token in zip(rows, tokens):
            request = row.request
            if request.cancelled.is_set():
                row.finished = "cancelled"
            elif token in self.eos:
                row.finished = "stop"
            else:
                request.events.put(("token", token))
                row.produced += 1
                row.last = token
                self.stats["tokens"] += 1
                if row.produced >= request.params.max_tokens or row.length + 1 >= self.context:
                    row.finished = "length"

    @staticmethod
    def _put_logprobs(rows: list[_Row], logits: Tensor, tokens: list[int]) -> None:
        """For rows that asked (params.logprobs), a ("logprobs", (token, logprob, top)) event before the
        token's own, also for an end-of-sequence token (scorers such as lm-eval count it)."""
        for i, row in enumerate(rows):
            if row.request.params.logprobs is not None:
                row.request.events.put(("logprobs", token_logprobs(logits[i], tokens[i], row.request.params.logprobs)))

    # ----- the KV cache ----------------------------------------------------------------------
    def _drop(self) -> None:
        for row in self.rows:
            if row.finished is None and row.request.cancelled.is_set():
                row.finished = "cancelled"
        keep = [i for i, r in enumerate(self.rows) if r.finished is None]
        if len(keep) == len(self.rows):
            return
        for row in self.rows:
            if row.finished is not None:
                self._finish_request(row.request, row.finished)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        self.cache.keep_rows(keep)

    def _check_cache_layout(self) -> None:
        """Serving edits the KV cache directly, so it must be the plain per-layer keys/values kind."""
        from transformers.cache_utils import DynamicLayer

        with self.lock:
            _, cache = self._forward(
                torch.tensor([[self.pad]], device=self.device),
                torch.ones((1, 1), dtype=torch.long, device=self.device),
                torch.zeros((1, 1), dtype=torch.long, device=self.device),
                None,
                [None],
            )
        kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [None])}
        if kinds != {DynamicLayer.__name__}:
            raise LorakitError(
                f"lorakit serve needs a model with a plain key/value cache; {type(self.model).__name__} uses "
                f"{sorted(kinds)}"
            )

    # ----- finishing -------------------------------------------------------------------------
    def _finish_request(self, request: Request, reason: str) -> None:
        self.stats["requests"] += 1
        request.events.put(("done", reason))
        self._release(request)

    def _release(self, request: Request) -> None:
        if request.adapter is not None and self.adapters is not None:
            self.adapters.release(request.adapter)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            waiting, self.waiting = list(self.waiting), deque()
        with self.lock:
            rows, self.rows, self.cache = self.rows, [], None
        for request in waiting + [r.request for r in rows]:
            request.events.put(("error", message))
            self._release(request)
