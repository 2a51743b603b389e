"""The continuous-batching engine: requests join and leave a running batch between steps.

    engine = Engine(model, tokenizer, max_batch=16, max_tokens_per_step=512)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64, stop_ids=(eos,)))
    while engine.has_work():
        for event in engine.step():     # Token, TextDelta (with a tokenizer), Finished
            ...
    engine.cancel(rid)                  # frees the slot now; Finished("cancelled") comes with the next step

Each step is one packed forward ([1, total] with cu_seqlens, no padding): one token for every
request that is decoding, then chunks of waiting prompts up to `max_tokens_per_step` tokens in
all, so a long prompt is prefilled in chunks between decode steps of the running requests.
Admission is bounded by the cache: a request takes a slot (at most `max_batch`) and, at once, the
KV pages for its prompt plus max_new_tokens, so it never runs out mid-way; one that does not fit
now waits (first come, first served); one that can never fit is refused by `add_request`.
With `prefix_reuse`, a request restores the longest snapshot that prefixes its prompt (see
prefix.py) and prefills the rest; the tokens restored are reported as cached_prompt_tokens.

Every request samples with its own generator (seeded by its SamplingParams.seed, or drawn from
torch's global generator when None), so its tokens do not depend on its batch neighbours.
Reported log-probabilities follow `logprobs.token_logprobs` (raw model distribution).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from xinzhou.cache import HybridCache, cache_sizes
from xinzhou.engine.graphs import DecodeGraphs
from xinzhou.engine.logprobs import logprobs_of
from xinzhou.engine.prefix import PrefixCache
from xinzhou.engine.sampling import Guide, SamplingParams, check_prompt, sample_token, validate_stops
from xinzhou.model import XinzhouLM
from xinzhou.tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True)
class Token:
    request_id: int
    token_id: int
    logprob: float | None  # None when the request's params.logprobs is False


@dataclass(frozen=True)
class TextDelta:
    request_id: int
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int  # restored from a prefix snapshot, not prefilled
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    request_id: int
    reason: str  # "stop" (stop id or stop string), "length" (max_new_tokens) or "cancelled"
    usage: Usage


Event = Token | TextDelta | Finished


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache (restored or computed)
    cached: int = 0  # of which restored from a snapshot
    output: list[int] = field(default_factory=list)
    decoder: IncrementalDecoder | None = None  # with a tokenizer
    guide: Guide | None = None
    held: str = ""  # decoded text not yet emitted: it could be the start of a stop string

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


class Engine:
    """model: an XinzhouLM (its device and dtype are the cache's). tokenizer: an xinzhou Tokenizer,
    for text deltas and stop strings (None: token events only). cache_bytes: the budget of the
    lightning states of max_batch slots plus the KV page pool (None: room for max_batch sequences
    of min(max_position_embeddings, 4096) tokens). prefix_state_bytes / prefix_entries bound the
    snapshots kept for prefix reuse (None: two snapshots per slot). cuda_graphs: steps where every
    request decodes run at fixed shapes, replayed from CUDA graphs on a GPU (engine/graphs.py; needs a
    bf16 model there); it takes one more slot's lightning state and one KV page, as scratch for the
    padding rows. On a CPU the same fixed-shape steps run eagerly (no faster: for tests)."""

    def __init__(self, model: XinzhouLM, tokenizer: Tokenizer | None = None, *, max_batch: int = 16,
                 max_tokens_per_step: int = 512, cache_bytes: int | None = None, page_size: int = 16,
                 prefix_reuse: bool = True, prefix_state_bytes: int | None = None,
                 prefix_entries: int | None = None, cuda_graphs: bool = False) -> None:
        for name, value in (("max_batch", max_batch), ("max_tokens_per_step", max_tokens_per_step),
                            ("page_size", page_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r}: must be an int >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_tokens_per_step = max_batch, max_tokens_per_step
        param = next(model.parameters())
        cfg = model.config
        page_bytes, per_slot = cache_sizes(cfg, page_size, param.dtype)
        state_bytes = max_batch * per_slot
        if cache_bytes is None:
            tokens = min(cfg.max_position_embeddings, 4096)
            cache_bytes = state_bytes + max_batch * -(-tokens // page_size) * page_bytes
        if cache_bytes < state_bytes:
            raise ValueError(f"cache_bytes = {cache_bytes}: less than the {state_bytes} bytes of lightning "
                             f"state that max_batch = {max_batch} slots need")
        num_pages = (cache_bytes - state_bytes) // page_bytes if page_bytes else 0
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs = {cuda_graphs!r}: must be True or False")
        scratch = 1 if cuda_graphs else 0  # a slot and a page that no request gets: the padding rows'
        self.cache = HybridCache(cfg, max_batch + scratch, num_pages=num_pages + scratch, page_size=page_size,
                                 device=param.device, dtype=param.dtype)
        self.graphs = None
        if cuda_graphs:
            slot = self.cache.acquire()
            self.cache.reserve(slot, 1)
            self.graphs = DecodeGraphs(model, self.cache, slot, max_batch)
        self.prefix = PrefixCache(
            self.cache,
            max_state_bytes=(2 * state_bytes if prefix_state_bytes is None else prefix_state_bytes) if prefix_reuse else 0,
            max_entries=(2 * max_batch if prefix_entries is None else prefix_entries) if prefix_reuse else 0)
        if prefix_reuse and per_slot and self.prefix.max_state_bytes < per_slot:
            raise ValueError(f"prefix_state_bytes = {self.prefix.max_state_bytes}: less than one snapshot "
                             f"({per_slot} bytes); pass prefix_reuse=False to turn reuse off")
        self._next_id = 0
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # in admission order
        self._requests: dict[int, _Request] = {}
        self._pending: list[Event] = []  # cancellations, reported by the next step
        self.prefill_tokens = 0  # prompt tokens computed (not restored), for tests and benchmarks

    # requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    guide: Guide | None = None) -> int:
        """Queue a request; returns its id. Refused at once (ValueError) when it can never fit.
        guide: called before each of its tokens with the output so far; returns (a token to force
        or None, token ids banned from the sample), e.g. `chat_format.CallGuide`."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        prompt = check_prompt(prompt_ids, self.model.config, params.max_new_tokens)
        validate_stops(params, self.model.config, self.tokenizer is not None)
        need = self.cache.pages_for(len(prompt) + params.max_new_tokens)
        pages = self.cache.num_pages - (len(self.cache.pages[self.graphs.scratch]) if self.graphs else 0)
        if need > pages:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens = {params.max_new_tokens} needs "
                             f"{need} KV pages of {self.cache.page_size} tokens; the cache has "
                             f"{pages} in all (raise cache_bytes)")
        device = self.cache.device
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        gen = torch.Generator(device=device).manual_seed(seed)
        if guide is not None and not callable(guide):
            raise ValueError(f"guide: expected a callable, got {type(guide).__name__}")
        req = _Request(self._next_id, prompt, params, gen, guide=guide)
        self._next_id += 1
        if self.tokenizer is not None:
            req.decoder = IncrementalDecoder(self.tokenizer)
        self.waiting.append(req)
        self._requests[req.id] = req
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stop a request now: its slot and pages are free before the next step, which reports
        Finished(reason="cancelled"). Cancelling a finished request does nothing."""
        req = self._requests.get(request_id)
        if req is None:
            if isinstance(request_id, int) and 0 <= request_id < self._next_id:
                return  # finished already
            raise ValueError(f"no request with id {request_id!r}")
        if req in self.waiting:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self.cache.release(req.slot)
        self._finish(req, "cancelled", self._pending)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    # one step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit what fits, run one packed forward, sample, and report what happened."""
        events, self._pending = self._pending, []
        self._admit()
        batch = self._plan()
        if not batch:
            return events
        reqs = [r for r, _ in batch]
        tokens = []
        for r, n in batch:
            tokens += r.output[-1:] if r.decoding else r.prompt[r.prefilled:r.prefilled + n]
        device = self.cache.device
        was_training = self.model.training
        if was_training:  # (toggling walks every module: only when needed)
            self.model.eval()
        try:
            if self.graphs is not None and all(r.decoding for r in reqs):
                logits = self.graphs.step(tokens, [r.slot for r in reqs])  # [N, V]
            else:
                ids = torch.tensor(tokens, dtype=torch.long, device=device)[None]  # [1, total]
                cu = torch.tensor([0, *itertools.accumulate(n for _, n in batch)], dtype=torch.int32, device=device)
                logits = self.model(ids, cu_seqlens=cu, cache=self.cache, slots=[r.slot for r in reqs],
                                    last_logits_only=True)[0]  # [N, V]
        finally:
            if was_training:
                self.model.train()

        sampling = []  # (row, request) of each request that gets a new token from this step
        for row, (r, n) in enumerate(batch):
            if not r.decoding:
                r.prefilled += n
                self.prefill_tokens += n
                if not r.decoding:
                    continue  # a chunk in the middle of the prompt: its logits are not needed
                self.prefix.add(r.prompt, r.slot)  # end of the prompt: where a conversation resumes
            sampling.append((row, r))
        if not sampling:
            return events
        rows = torch.tensor([row for row, _ in sampling], device=device)
        logits = logits[rows]  # [M, V]
        greedy = logits.argmax(-1)  # [M]
        chosen = [self._choose(r, logits[i], greedy[i]) for i, (_, r) in enumerate(sampling)]
        lps = logprobs_of(logits, torch.tensor(chosen, device=device)).tolist()
        for (_, r), tok, lp in zip(sampling, chosen, lps):
            self._emit(r, tok, lp, events)
        return events

    def _choose(self, r: _Request, logits: torch.Tensor, greedy: torch.Tensor) -> int:
        """The request's next token from its logits row [V]; a guide may force it or ban ids."""
        if r.guide is not None:
            forced, banned = r.guide(r.output)
            if forced is not None:
                return int(forced)
            if banned:
                logits = logits.index_fill(0, torch.tensor(list(banned), device=logits.device), float("-inf"))
                greedy = logits.argmax()
        return int(greedy) if r.params.temperature == 0 else sample_token(logits, r.params, r.generator)

    def _admit(self) -> None:
        """Waiting requests, first come first served, while a slot and their pages are free
        (evicting prefix snapshots when pages are short)."""
        while self.waiting and self.cache.free_slots:
            req = self.waiting[0]
            total = len(req.prompt) + req.params.max_new_tokens
            snap = self.prefix.lookup(req.prompt)
            need = self.cache.pages_to_restore(snap, total) if snap else self.cache.pages_for(total)
            while len(self.cache.free_pages) < need and self.prefix.evict_lru(keep=snap):
                pass
            if len(self.cache.free_pages) < need:
                return
            self.waiting.popleft()
            req.slot = self.cache.acquire()
            if snap is not None:
                self.cache.restore(req.slot, snap)
                req.prefilled = req.cached = snap.length
            self.cache.reserve(req.slot, total)
            self.running.append(req)

    def _plan(self) -> list[tuple[_Request, int]]:
        """(request, new tokens) for this step: every decoding request, then prompt chunks in
        admission order within the token budget."""
        batch = [(r, 1) for r in self.running if r.decoding]
        budget = self.max_tokens_per_step - len(batch)
        for r in self.running:
            if budget <= 0:
                break
            if not r.decoding:
                n = min(len(r.prompt) - r.prefilled, budget)
                batch.append((r, n))
                budget -= n
        return batch

    # tokens, text and ends -------------------------------------------------------------------
    def _emit(self, r: _Request, tok: int, lp: float, events: list[Event]) -> None:
        r.output.append(tok)
        events.append(Token(r.id, tok, lp if r.params.logprobs else None))
        p = r.params
        reason = None
        if tok in p.stop_ids:  # a stop id ends the text without adding its own
            reason = "stop"
        elif r.decoder is not None:
            text = r.held + r.decoder.push(tok)
            cut = min((i for i in (text.find(s) for s in p.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                text, r.held, reason = text[:cut], "", "stop"
            else:  # hold back a tail that could still become a stop string
                keep = max((k for s in p.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                text, r.held = text[:len(text) - keep], text[len(text) - keep:]
            if text:
                events.append(TextDelta(r.id, text))
        if reason is None and len(r.output) == p.max_new_tokens:
            reason = "length"
        if reason is None:
            return
        by_string = reason == "stop" and tok not in p.stop_ids
        if r.decoder is not None and not by_string:
            rest = r.held + r.decoder.flush()  # the held tail was no stop string after all
            if rest:
                events.append(TextDelta(r.id, rest))
        self.running.remove(r)
        if len(r.output) > 1:  # the cache holds the prompt and every token but the last
            self.prefix.add(r.prompt + r.output[:-1], r.slot)
        self.cache.release(r.slot)
        self._finish(r, reason, events)

    def _finish(self, r: _Request, reason: str, events: list[Event]) -> None:
        del self._requests[r.id]
        events.append(Finished(r.id, reason, Usage(len(r.prompt), r.cached, len(r.output))))
