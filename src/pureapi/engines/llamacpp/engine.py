"""The llama.cpp scheduler: n_parallel slots over one llama context, continuous batching, KV reuse.

One llama context holds `n_parallel` KV sequences ("slots") drawing cells from one shared pool
(llama.cpp's unified KV cache), so a slot costs no memory until it holds tokens, and one
conversation may grow to the window (`context_length`, never more than the pool). When the pool
runs out, `pool.KVPool` evicts idle slots' KV and parks running generations until one ends, and
once slots generating side by side have scattered their cells, it lays each slot's KV out again. One
scheduler thread owns the context, the batch and the samplers. Each step it admits waiting jobs
into free slots (`slots.choose_slot`), builds one batch (`batch.plan_step`: a decode token per
generating slot, then prompt chunks), calls `llama_decode` once, and samples every slot that has
logits with that request's own sampler (its chain, checked against a JSON grammar when it has one),
reading the raw log-probabilities first for a request that asked for logprobs. KV is reused from
the slot's own cache, from a saved state that shares the prompt's prefix (`prompt_cache`: a slot's
KV is saved there, found by its tokens, before another prompt overwrites it), or shared with
another slot that holds the prefix (the cells are shared, not copied); when idle, the opening of a
finished conversation's next turn is decoded ahead. docs/design.md explains each mechanism and
records what was measured.

Scheduler invariants:
1. Only the scheduler thread calls into the context, the batch and the samplers; request threads
   only tokenize (the vocabulary is read-only) and submit jobs (one OpenMP thread team: a second
   thread that decodes slows the first one down).
2. `slot.cached` lists exactly the tokens whose KV sequence `slot.id` stores, at positions
   0..len-1; every decode or `llama_memory_seq_rm` updates it in the same step. After a failed
   decode the slot's sequence is wiped and `cached` emptied.
3. A job is in exactly one place: the waiting queue, one slot, or done; it gets exactly one
   terminal `finish` or `fail` (a cancelled one gets `fail(Cancelled)`, which nobody may read).
4. A generating slot's `next_token` has been sampled and emitted but is not yet in the KV; the
   next step decodes it at position `len(cached)`. A prefilling slot has `pending` prompt tokens
   and no `next_token`; logits are requested only for the last prompt token and decode tokens,
   so each slot has at most one output per step.
5. Prompt chunks are taken in admission order, at most `n_batch` tokens per step in all, so a
   long prompt is spread over several steps while the other slots keep generating.
6. A cancelled job is dropped at the start of the next step; the KV it built stays in its slot
   as cache for a later prompt with the same prefix.
7. A saved state holds exactly the KV of its `tokens`, copied while invariant 2 held, and is
   saved under the scope and session of the prompts that built it. After a reset no slot keeps KV
   under the session for a turn that began before it: slots lose the claim (and are no longer
   saved) at the next admission, and a turn still queued at the reset is admitted as no session's,
   into a slot that is never saved.
   A slot admitted for a prompt of another scope keeps none of its KV (prompt_cache invariant 3).
8. A parked slot (pool.KVPool) has a job but no KV: it is left out of every step until it is
   resumed, with its `cached` tokens restored exactly; no job is admitted while one is parked.
   A preempted job (shell invariant 5) holds no slot: its KV and progress wait in `_preempted`
   until it is admitted again, into any free slot, exactly as they were (parked if the pool has
   no room for them then); nothing is preempted while a generation is parked.
9. `slot.opening` is non-empty only on a free slot whose last reply ended (at end of turn or at
   max_tokens; then the reply's last token, emitted but not decoded, comes first). It is
   decoded (at positions `len(cached)` on) only after the scheduler has waited AHEAD_IDLE_SECONDS
   with nothing to do, and dropped when the slot is taken, wiped or its session forgotten.
"""

from __future__ import annotations

import codecs
import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...errors import BadRequest, ContextOverflow, EngineError, NotReady, PureAPIError
from ...models.resolve import ResolvedModel
from ...types import Chunk, GenerationRequest, Message, TokenLogprob
from ..base import Engine, system_fingerprint
from ..jobs import Job
from ..shell import Backend, EngineShell
from .batch import Batch, Row, plan_step
from .kv import SequenceKV
from .loader import open_context, state_files
from .model import LlamaModel
from .pool import KVPool, Preempted
from .prompt_cache import Found, PromptCache
from .reuse import KVReuse
from .sampling import grammar_of, log_softmax, make_sampler, token_logprob
from .slots import Slot, cheapest, choose_slot, common_prefix
from .state_files import StateFiles

log = logging.getLogger(__name__)

# Idle this long after a reply ends, the scheduler decodes the opening of the conversation's next turn.
# Longer than a client takes to send its next request, far shorter than a person takes to write one.
AHEAD_IDLE_SECONDS = 0.1


# The counters /metrics shows, as pureapi_engine_<name>_total.
# The scheduler's counters (tests, /status); those from generated_tokens on are on /metrics as _total.
STATS = (
    "prefilled_tokens",
    "restored_tokens",  # reused from a saved state
    "copied_tokens",  # reused from another slot's KV
    "saved_states",
    "saves_skipped",  # the prompt cache held the slot's tokens already
    "ahead_tokens",  # turn openings decoded while idle
    "steps",
    "generated_tokens",
    "kv_cache_hits",  # turns that reused some KV
    "kv_cache_misses",
    "reused_tokens",  # kept in a slot's KV, restored ones included
    "restored_tokens_ram",
    "restored_tokens_disk",
    "restored_bytes_ram",
    "restored_bytes_disk",
    "evicted_slots",  # idle slots' KV moved to the prompt cache (or dropped) out of the shared pool
    "parked_jobs",  # running generations set aside for want of cells
    "resumed_jobs",
    "preempted_jobs",  # generations set aside for another tenant's request (shell invariant 5)
    "compactions",  # times every slot's KV was laid out in one run of cells again (pool.KVPool.compact)
    "compacted_tokens",
)
COUNTED = STATS[STATS.index("generated_tokens") :]


class LlamaCppEngine(Engine, Backend):
    """Serves a GGUF model with llama.cpp: n_parallel slots, continuous batching, prefix reuse.

    The engine shell owns the queue, the scheduler thread and every job's lifecycle; this class is its
    backend (admission into a slot, one decode step, turn openings when idle).
    """

    name = "llamacpp"
    idle_seconds = AHEAD_IDLE_SECONDS

    def __init__(
        self,
        model: LlamaModel,
        ctx: Any,
        model_name: str,
        file_size: int,
        window: int,
        n_batch: int,
        max_queue: int,
        kv_cache_mb: int = 0,
        disk: StateFiles | None = None,
    ):
        llc = self._llc = model.llc
        self.model = model
        self.tool_format = model.tool_format
        self._ctx = ctx
        self.model_name = model_name
        self.device = "cpu"
        self.kv = SequenceKV(llc, ctx)
        self.n_ctx = int(llc.llama_n_ctx(ctx))  # cells of the pool all slots share
        self.context_length = min(window, self.n_ctx)  # one conversation's window
        self.vocab_size: int = model.n_vocab
        self._memory = file_size + self.n_ctx * model.kv_bytes_per_token()
        self._batch = Batch(llc, n_batch)
        self._opening = model.turn_opening()[: n_batch // 2]
        self._slots = [Slot(i) for i in range(int(llc.llama_n_seq_max(ctx)))]
        self.slots = len(self._slots)  # generations that run at once, for the server's admission cap
        self._ticks = itertools.count(1)
        # Written only by the scheduler thread.
        self.stats: Counter[str] = Counter(dict.fromkeys(STATS, 0))
        # Slots' KV states saved before another prompt took the slot (RAM, then disk), and all at shutdown.
        self.prompt_cache = PromptCache(kv_cache_mb * 1024 * 1024, disk)
        # The scheduler: the shell's worker is the only thread that touches the context, the batch and
        # the samplers (invariant 1).
        self._shell = EngineShell(self, max_queue, "llamacpp-scheduler", self.slots)
        self.reuse = KVReuse(self.kv, self.prompt_cache, self._slots, self._shell.jobs, self.stats)
        self.pool = KVPool(self.kv, self.reuse, self._slots, self.stats)
        self._preempted: dict[Job, Preempted] = {}  # set aside for another tenant, back in the queue
        self._shell.start()

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        n_threads: int | None = None,
        ctx_size: int | None = None,
        n_parallel: int | None = None,
        kv_pool: int | None = None,
        max_queue: int = 64,
        n_batch: int = 512,
        flash_attn: bool = True,
        kv_cache_mb: int = 0,
        state_dir: Path | None = None,
        kv_disk_mb: int = 0,
    ) -> LlamaCppEngine:
        """Load a GGUF file with n_parallel slots sharing a pool of kv_pool KV cells.

        ctx_size is one conversation's window (default: the model's, capped on CPU); the pool
        defaults to `pool_windows(n_parallel)` windows, and a window never exceeds the pool;
        n_parallel defaults to as many slots as the pool has room for (loader.default_slots).

        kv_cache_mb bounds the RAM that saved KV states (of slots another prompt took) may take (0:
        none are kept); kv_disk_mb the disk they spill to under state_dir, where every slot's state
        is also written at close, so that it survives a restart (0 or no state_dir: not on disk).
        Flash attention is llama.cpp's default on CPU (faster; see docs/design.md).
        """
        path = resolved.path
        model, ctx, window = open_context(resolved, ctx_size, n_parallel, kv_pool, n_batch, n_threads, flash_attn)
        disk = state_files(path, model, flash_attn, state_dir, kv_disk_mb)
        size = path.stat().st_size
        engine = cls(model, ctx, resolved.name, size, window, n_batch, max_queue, kv_cache_mb, disk)
        engine.system_fingerprint = system_fingerprint(resolved.name, path.stat().st_size, model.llc.__version__)
        log.info(
            "loaded %s: %d slots sharing %d KV cells, windows of %d tokens",
            resolved.name,
            engine.slots,
            engine.n_ctx,
            engine.context_length,
        )
        return engine

    def encode_chat(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> list[int]:
        return self.model.encode_chat(messages, tools, prefix)

    def encode_text(self, text: str) -> list[int]:
        # As llama-server's /completion does: BOS as the vocabulary says, special tokens parsed.
        return self.model.tokenize(text, parse_special=True, add_special=True)

    def memory_allocated(self) -> int:
        """The model file's size, the KV cache, and the sessions' states kept in RAM."""
        return self._memory + self.prompt_cache.bytes

    @property
    def saved_state_bytes(self) -> int:
        """Bytes of sequence states now in the RAM cache (never above kv_cache_mb)."""
        return self.prompt_cache.bytes

    def ready(self) -> bool:
        return self._shell.ready()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "parallel": len(self._slots)}

    def metrics(self) -> dict[str, float]:
        # Read without the scheduler's cooperation: each value is one int, so a scrape sees a recent one.
        active = sum(1 for s in self._slots if s.job is not None)
        disk = self.prompt_cache.disk
        return {
            "slots_active": active,
            "slots_free": len(self._slots) - active,
            "slots_parked": len(self.pool.parked),
            "kv_pool_tokens": self.n_ctx,
            "kv_pool_used_tokens": sum(len(s.cached) for s in self._slots),
            **{f"{name}_total": self.stats[name] for name in COUNTED},
            "saved_state_bytes_ram": self.prompt_cache.bytes,
            "saved_state_bytes_disk": disk.total_bytes() if disk is not None else 0,
        }

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if not request.prompt_ids:
            raise BadRequest("the prompt is empty", param="messages")
        if len(request.prompt_ids) >= self.context_length:
            raise ContextOverflow(
                f"the prompt is {len(request.prompt_ids)} tokens but the context is {self.context_length} tokens"
            )
        if not self.ready():
            raise NotReady("the model is not loaded")
        if request.params.json_schema is not None:
            grammar_of(request.params.json_schema)  # converted here, off the scheduler: a bad schema is a 400 now
        return self._shell.submit(request)

    def close(self) -> None:
        if not self._shell.close():  # still inside llama_decode: freeing now would crash it
            log.warning("llama.cpp scheduler did not stop; leaving its memory allocated")

    # --- the shell's backend: called on the scheduler thread only ---

    def shutdown(self) -> None:
        """Every job has ended: write the KV states to disk and free the context and the model."""
        for slot in self._slots:
            self._release(slot)
        for held in self._preempted.values():
            held.free()
        self._preempted.clear()
        try:
            self.reuse.persist()
        except Exception:  # a full disk must not stop the shutdown
            log.exception("could not write the sessions' KV states")
        self.prompt_cache.drain()
        self._batch.free()
        self._llc.llama_free(self._ctx)
        self.model.free()

    def has_room(self) -> bool:
        # While a generation is parked for want of cells, a new one would only take more of them.
        return not self.pool.any_parked() and any(s.job is None for s in self._slots)

    def running(self) -> list[Job]:
        return [s.job for s in self._slots if s.job is not None]

    def wants_idle(self) -> bool:
        return any(s.opening for s in self._slots)

    def idle(self) -> None:
        self._decode_openings()

    def step(self) -> None:
        self.pool.resume()
        self.pool.compact()
        self._step()

    def drop(self, job: Job, failed: bool = False) -> None:
        for slot in self._slots:
            if slot.job is job:
                if failed:
                    self.kv.wipe(slot)  # invariant 2: a failed decode leaves no partial sequence behind
                self._release(slot)

    def can_preempt(self) -> bool:
        return not self.pool.any_parked()  # a parked generation waits for cells: none to spare

    def preempt(self, job: Job) -> bool:
        """Copy the job's KV out of the pool and free its slot; `admit` puts it back (invariant 8)."""
        slot = next(s for s in self._slots if s.job is job)
        kv = self.pool.copy_out(slot)
        if kv is None:
            return False
        log.info("slot %d (%d tokens) preempted for another tenant's request", slot.id, len(kv.tokens))
        self._preempted[job] = Preempted(
            kv, slot.admitted, slot.pending, slot.next_token, slot.generated, slot.sampler, slot.decoder
        )
        slot.sampler = None  # the job's own now, not freed with the slot
        slot.session_id = None  # its conversation left with the job
        self._release(slot)
        self.stats["preempted_jobs"] += 1
        return True

    def discard(self, job: Job) -> None:
        held = self._preempted.pop(job, None)
        if held is not None:
            held.free()

    def admit(self, job: Job) -> None:
        """Put a job into the free slot that keeps the most useful KV (a preempted one: into any)."""
        forgotten = self.reuse.apply_forgets()  # before a slot is picked by its session
        if job.session in forgotten and job.number <= forgotten[job.session]:
            # Submitted before its session's reset: its KV (the forgotten conversation) is nobody's.
            job.session, job.savable = None, False
        held = self._preempted.pop(job, None)
        if held is not None:
            return self._resume(job, held)
        prompt, scope = job.request.prompt_ids, job.request.cache_scope
        found = self.prompt_cache.find(prompt, scope) if self.prompt_cache.enabled else None
        saved = min(found.common, len(prompt) - 1) if found is not None else 0
        free = [s for s in self._slots if s.job is None]
        slot = choose_slot(free, self._slots, prompt, job.session, scope, saved)
        try:
            self._start(slot, job, found)
            self.reuse.clear_idle(keep=slot)
        except PureAPIError:  # the request's own fault (llama.cpp refused its grammar)
            self._release(slot)  # nothing was decoded: the slot's KV still matches `cached`
            raise
        except Exception:
            self.kv.wipe(slot)
            self._release(slot)
            raise

    def _resume(self, job: Job, held: Preempted) -> None:
        """Admit a preempted job again: its KV and progress go into the free slot cheapest to lose."""
        slot = cheapest(s for s in self._slots if s.job is None)
        self.reuse.save(slot, len(slot.cached))  # what the slot held stays findable, as at any admission
        self.kv.wipe(slot)
        slot.job, slot.session_id, slot.scope, slot.savable = job, job.session, job.request.cache_scope, job.savable
        slot.admitted, slot.last_used = held.admitted, next(self._ticks)
        slot.pending, slot.next_token, slot.generated = held.pending, held.next_token, held.generated
        slot.sampler, slot.decoder = held.sampler, held.decoder
        state = held.parked.state
        if state is not None and not self.reuse.load(slot, list(held.parked.tokens), state):
            self.pool.hold(slot, held.parked)  # the pool is full of running generations: wait as a parked one
        self.reuse.clear_idle(keep=slot)

    def _running(self) -> list[Slot]:
        """The slots that take part in the next step: those with a job, less the parked ones."""
        return [s for s in self._slots if s.job is not None and not self.pool.is_parked(s)]

    def _start(self, slot: Slot, job: Job, found: Found | None) -> None:
        """Put the job into the slot; `found` is the saved state admission found for its prompt."""
        prompt, session, scope = job.request.prompt_ids, job.session, job.request.cache_scope
        # Keep the KV of the common prefix, but always re-decode the last prompt token for its logits.
        keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1) if slot.scope == scope else 0
        # What the slot is about to lose is saved first, found later by its tokens (before the trim below).
        self.reuse.save(slot, len(slot.cached) - keep)
        restored = self.reuse.restore(slot, found, prompt, keep)
        copied = not restored and self.reuse.copy_prefix(slot, prompt, scope, keep)
        if restored or copied:
            keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1)
        keep = self.kv.trim(slot, keep)
        self.stats["reused_tokens"] += keep
        self.stats["kv_cache_hits"] += keep > 0
        self.stats["kv_cache_misses"] += keep == 0
        if restored:
            self.stats["restored_tokens"] += keep
            self.stats[f"restored_tokens_{self.prompt_cache.taken_from}"] += keep
        elif copied:
            self.stats["copied_tokens"] += keep
        # Everything the slot now holds is a prefix of this prompt: its sender's to keep.
        slot.job, slot.session_id, slot.scope, slot.savable, slot.opening = job, session, scope, job.savable, []
        job.cached_tokens = keep
        slot.admitted = slot.last_used = next(self._ticks)
        slot.pending = list(prompt[keep:])
        slot.next_token, slot.generated = None, 0
        slot.sampler = make_sampler(self._llc, self.model.vocab, job.request.params)
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def forget(self, session_id: str) -> None:
        """A reset: drop the states only the session reached now, and its slot's claim at the next step."""
        self.reuse.forget(session_id)

    def _step(self) -> None:
        """One llama_decode: a token per generating slot, then prompt chunks; then sample."""
        batch = self._batch
        plan: list[tuple[Row, int]] = []

        def decode() -> int:
            batch.clear()
            rows = plan_step(self._running(), batch.capacity)
            plan[:] = [(row, batch.add(row.slot, row.tokens, row.logits)) for row in rows]
            return batch.decode(self._ctx) if plan else 0

        rc = self.pool.fit(decode, self._running)  # evicts idle KV, then parks, while the pool is full
        if rc != 0:
            raise EngineError(f"llama_decode failed (code {rc})")
        self.stats["steps"] += 1
        if len(plan) > 1:
            self.pool.decoded_side_by_side(sum(1 for row, _ in plan if not row.prefill))
        for row, out in plan:
            slot = row.slot
            slot.cached.extend(row.tokens)
            if row.prefill:
                del slot.pending[: len(row.tokens)]
                self.stats["prefilled_tokens"] += len(row.tokens)
            if row.logits:
                top = slot.job.request.params.logprobs if slot.job is not None else None
                # Read before sampling: the raw distribution, and only for requests that ask for it.
                dist = (
                    None
                    if top is None
                    else log_softmax(self._llc.llama_get_logits_ith(self._ctx, out), self.vocab_size)
                )
                token = slot.sampler.sample(self._ctx, out)
                lp = None if dist is None or top is None else token_logprob(dist, token, top, self.model.piece)
                self._accept(slot, token, lp)

    def _accept(self, slot: Slot, token: int, logprob: TokenLogprob | None = None) -> None:
        """Handle a sampled token: stop on end-of-generation, else emit its text (and logprob) and queue its decode."""
        job = slot.job
        assert job is not None  # only active slots are sampled
        slot.next_token = None
        if self.model.is_eog(token):
            return self._finish(slot, "stop")
        slot.generated += 1
        self.stats["generated_tokens"] += 1
        job.emit(slot.decoder.decode(self.model.piece(token)), slot.generated, [logprob] if logprob else None)
        if slot.generated >= job.request.params.max_tokens or len(slot.cached) >= self.context_length:
            return self._finish(slot, "length", token)
        slot.next_token = token

    def _finish(self, slot: Slot, reason: str, undecoded: int | None = None) -> None:
        """End the slot's job; `undecoded` is the reply's last token when it was emitted but not decoded."""
        job = slot.job
        assert job is not None
        job.emit(slot.decoder.decode(b"", final=True), slot.generated)
        job.finish(reason, slot.generated)
        self._release(slot)
        # The conversation's next turn, if it comes, goes on after the reply with the turn opening.
        opening = ([] if undecoded is None else [undecoded]) + self._opening
        if self._opening and len(slot.cached) + len(opening) < self.context_length:
            slot.opening = opening

    def _decode_openings(self) -> None:
        """Decode the waiting turn openings in one batch, without logits (idle time only, invariant 9)."""
        self.stats["ahead_tokens"] += self.kv.decode_openings(self._batch, self._slots)

    def _release(self, slot: Slot) -> None:
        if slot.sampler is not None:
            slot.sampler.free()
        slot.job, slot.sampler, slot.decoder, slot.next_token = None, None, None, None
        slot.pending, slot.opening = [], []
        slot.last_used = next(self._ticks)
        self.pool.released(slot)
