"""The llama.cpp scheduler: n_parallel slots over one llama context, continuous batching, KV reuse.

One llama context holds `n_parallel` KV sequences ("slots"); each slot owns `n_ctx / n_parallel`
cells, so one conversation can never crowd out another. One scheduler thread owns the context,
the batch and the samplers. Each step it admits waiting jobs into free slots (`slots.choose_slot`),
moves the active slots next to each other, builds one batch (`batch.plan_step`: a decode token per
generating slot, then prompt chunks), calls `llama_decode` once, and samples every slot that has
logits with that request's own sampler (its chain, checked against a JSON grammar when it has one),
reading the raw log-probabilities first for a request that asked for logprobs. KV is reused from
the slot's own cache, from a saved state that shares the prompt's prefix (`prompt_cache`: a slot's
KV is saved there, found by its tokens, before another prompt overwrites it), or copied from
another slot that shares the prefix; when idle, the opening of a finished conversation's next turn
is decoded ahead. docs/design.md explains each mechanism and records what was measured.

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
8. `self._slots` is ordered by `id`, a slot's sequence id. Ids change only in `_swap`, between
   steps, and the KV moves with them. Before every decode `_compact` has given the active slots
   consecutive ids (unless llama.cpp refused to copy a state).
9. `slot.opening` is non-empty only on a free slot whose last reply ended (at end of turn or at
   max_tokens; then the reply's last token, emitted but not decoded, comes first). It is
   decoded (at positions `len(cached)` on) only after the scheduler has waited AHEAD_IDLE_SECONDS
   with nothing to do, and dropped when the slot is taken, wiped or its session forgotten.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BadRequest, Cancelled, ContextOverflow, EngineError, ModelLoadError, NotReady, PureAPIError
from ...models.resolve import CPU_CONTEXT_CAP, ResolvedModel, check_gguf
from ...types import Chunk, GenerationRequest, Message, TokenLogprob
from ..base import Engine, model_fingerprint, system_fingerprint
from ..jobs import Job, JobQueue
from .batch import Batch, plan_step
from .model import LlamaModel
from .prompt_cache import Found, PromptCache
from .sampling import grammar_of, log_softmax, make_sampler, token_logprob
from .slots import MIN_COPIED_TOKENS, Slot, choose_slot, common_prefix, compaction_swap
from .state_files import StateFiles

if TYPE_CHECKING:
    from .prompt_cache import State

log = logging.getLogger(__name__)

# A slot losing fewer tokens than this is not saved: re-prefilling so few is cheap, the RAM better spent.
MIN_SAVED_TOKENS = 16
# Idle this long after a reply ends, the scheduler decodes the opening of the conversation's next turn.
# Longer than a client takes to send its next request, far shorter than a person takes to write one.
AHEAD_IDLE_SECONDS = 0.1


def _cpu_count() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class LlamaCppEngine(Engine):
    """Serves a GGUF model with llama.cpp: n_parallel slots, continuous batching, prefix reuse."""

    name = "llamacpp"

    def __init__(
        self,
        model: LlamaModel,
        ctx: Any,
        model_name: str,
        file_size: int,
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
        self._mem = llc.llama_get_memory(ctx)
        self.n_ctx = int(llc.llama_n_ctx(ctx))
        self.context_length = int(llc.llama_n_ctx_seq(ctx))
        self.vocab_size: int = model.n_vocab
        self._memory = file_size + self.n_ctx * model.kv_bytes_per_token()
        self._batch = Batch(llc, n_batch)
        self._opening = model.turn_opening()[: n_batch // 2]
        self._slots = [Slot(i) for i in range(int(llc.llama_n_seq_max(ctx)))]
        self.slots = len(self._slots)  # generations that run at once, for the server's admission cap
        self._ticks = itertools.count(1)
        # Counters for tests and /status; written only by the scheduler thread.
        self.stats: dict[str, int] = {
            "prefilled_tokens": 0,
            "reused_tokens": 0,  # kept in a slot's KV, restored ones included
            "restored_tokens": 0,  # reused from a saved sequence state
            "copied_tokens": 0,  # reused from another slot's KV (a shared prefix)
            "saved_states": 0,
            "moved_slots": 0,  # swaps by _compact
            "ahead_tokens": 0,  # turn openings decoded while idle
            "generated_tokens": 0,
            "steps": 0,
            "kv_cache_hits": 0,  # turns that reused some KV
            "kv_cache_misses": 0,  # turns that reused none
            "restored_tokens_ram": 0,
            "restored_tokens_disk": 0,
            "restored_bytes_ram": 0,
            "restored_bytes_disk": 0,
        }
        # Slots' KV states saved before another prompt took the slot (RAM, then disk), and all at shutdown.
        self.prompt_cache = PromptCache(kv_cache_mb * 1024 * 1024, disk)
        # Sessions reset since the scheduler's last admission -> the last job number submitted before.
        self._forgotten: dict[str, int] = {}
        # Guards _forgotten: forget() runs on request threads, _apply_forgets on the scheduler.
        self._forget_lock = threading.Lock()
        self._jobs = JobQueue(max_queue)
        # The scheduler: the only thread that touches the context, the batch and the samplers.
        self._thread = threading.Thread(target=self._loop, name="llamacpp-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        n_parallel: int = 4,
        max_queue: int = 64,
        n_batch: int = 512,
        flash_attn: bool = True,
        kv_cache_mb: int = 0,
        state_dir: Path | None = None,
        kv_disk_mb: int = 0,
    ) -> LlamaCppEngine:
        """Load a GGUF file; n_ctx is the total context, split evenly over the n_parallel slots.

        kv_cache_mb bounds the RAM that saved KV states (of slots another prompt took) may take (0:
        none are kept); kv_disk_mb the disk they spill to under state_dir, where every slot's state
        is also written at close, so that it survives a restart (0 or no state_dir: not on disk).
        Flash attention is llama.cpp's default on CPU (faster; see docs/design.md).
        """
        path = resolved.path
        if not resolved.is_gguf:
            raise ModelLoadError(f"model {path}: the llamacpp engine needs a .gguf file")
        check_gguf(path)
        model = LlamaModel(path)
        llc = model.llc
        if n_ctx is None:
            n_ctx = min(model.n_ctx_train() or 2048, CPU_CONTEXT_CAP) * n_parallel
        params = llc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_seq_max = n_parallel
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads or _cpu_count()
        params.flash_attn_type = llc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.kv_unified = False  # one KV stream per slot: each slot owns n_ctx / n_parallel cells
        ctx = llc.llama_init_from_model(model.ptr, params)
        if not ctx:
            model.free()
            raise ModelLoadError(f"model file {path}: llama.cpp cannot create a {n_ctx}-token context")
        disk = None
        if state_dir is not None and kv_disk_mb > 0:
            # KV bytes fit only this model file, llama.cpp build and attention kernel.
            key = model_fingerprint(path, llc.__version__, flash_attn)
            try:
                disk = StateFiles(state_dir / key, kv_disk_mb * 1024 * 1024)
            except OSError as exc:
                log.warning("KV states stay in RAM only: cannot use %s (%s)", state_dir, exc)
        engine = cls(model, ctx, resolved.name, path.stat().st_size, n_batch, max_queue, kv_cache_mb, disk)
        engine.system_fingerprint = system_fingerprint(resolved.name, path.stat().st_size, "llama.cpp", llc.__version__)
        log.info("loaded %s: %d slots of %d tokens", resolved.name, n_parallel, engine.context_length)
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
        return self._thread.is_alive() and not self._jobs.closed

    def info(self) -> dict[str, Any]:
        return {**super().info(), "parallel": len(self._slots)}

    def metrics(self) -> dict[str, float]:
        # Read without the scheduler's cooperation: each value is one int, so a scrape sees a recent one.
        active = sum(1 for s in self._slots if s.job is not None)
        stats, disk = self.stats, self.prompt_cache.disk
        return {
            "slots_active": active,
            "slots_free": len(self._slots) - active,
            "kv_cache_hits_total": stats["kv_cache_hits"],
            "kv_cache_misses_total": stats["kv_cache_misses"],
            "reused_tokens_total": stats["reused_tokens"],
            "restored_tokens_ram_total": stats["restored_tokens_ram"],
            "restored_tokens_disk_total": stats["restored_tokens_disk"],
            "restored_bytes_ram_total": stats["restored_bytes_ram"],
            "restored_bytes_disk_total": stats["restored_bytes_disk"],
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
        return self._jobs.submit(request).stream()

    def close(self) -> None:
        if not self._jobs.close():  # fails what still waits and wakes the scheduler
            return
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # still inside llama_decode: freeing now would crash it
            log.warning("llama.cpp scheduler did not stop; leaving its memory allocated")
            return
        self._jobs.fail_all("server shutting down")
        for slot in self._slots:
            if slot.job is not None:
                slot.job.fail(Cancelled("server shutting down"))
            self._release(slot)
        try:
            self._persist()
        except Exception:  # a full disk must not stop the shutdown
            log.exception("could not write the sessions' KV states")
        self.prompt_cache.drain()
        self._batch.free()
        self._llc.llama_free(self._ctx)
        self.model.free()

    # --- the scheduler thread ---

    def _loop(self) -> None:
        while not self._jobs.closed:
            if not self._admit():
                break
            for slot in self._active():
                if slot.job is not None and slot.job.request.cancel.is_set():
                    # Its reader may still wait (a shutdown or reset cancelled it): end its stream.
                    slot.job.fail(Cancelled("generation cancelled"))
                    self._release(slot)
            if not self._active():
                continue
            try:
                self._compact()
                self._step()
            except Exception as exc:  # the scheduler must survive a failed step
                log.exception("llama.cpp step failed")
                err = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")
                for slot in self._active():
                    self._wipe(slot)
                    if slot.job is not None:
                        slot.job.fail(err)
                    self._release(slot)
        for slot in self._active():
            if slot.job is not None:
                slot.job.fail(Cancelled("server shutting down"))
            self._release(slot)

    def _active(self) -> list[Slot]:
        return [s for s in self._slots if s.job is not None]

    def _admit(self) -> bool:
        """Move waiting jobs into free slots; block only when nothing is running. False: shut down."""
        while True:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return True
            if self._active():
                job = self._jobs.take(timeout=0)
            elif any(s.opening for s in self._slots):
                job = self._jobs.take(timeout=AHEAD_IDLE_SECONDS)
            else:
                job = self._jobs.take()
            if job is None:
                if self._jobs.closed:
                    return False
                if not self._active():
                    self._decode_openings()  # idle for a while: nobody waits for this decode
                return True
            if job.request.cancel.is_set():
                job.fail(Cancelled("cancelled before it started"))
                continue
            forgotten = self._apply_forgets()  # before a slot is picked by its session
            if job.session in forgotten and job.number <= forgotten[job.session]:
                # Submitted before its session's reset: its KV (the forgotten conversation) is nobody's.
                job.session, job.savable = None, False
            prompt, scope = job.request.prompt_ids, job.request.cache_scope
            found = self.prompt_cache.find(prompt, scope) if self.prompt_cache.enabled else None
            saved = min(found.common, len(prompt) - 1) if found is not None else 0
            slot = choose_slot(free, self._slots, prompt, job.session, scope, saved)
            try:
                self._start(slot, job, found)
            except PureAPIError as exc:  # the request's own fault (llama.cpp refused its grammar)
                job.fail(exc)
                self._release(slot)  # nothing was decoded: the slot's KV still matches `cached`
            except Exception as exc:  # one bad admission must not stop the scheduler
                log.exception("llama.cpp admission failed")
                job.fail(EngineError(f"generation failed: {exc}"))
                self._wipe(slot)
                self._release(slot)

    def _start(self, slot: Slot, job: Job, found: Found | None) -> None:
        """Put the job into the slot; `found` is the saved state admission found for its prompt."""
        llc, prompt, session, scope = self._llc, job.request.prompt_ids, job.session, job.request.cache_scope
        # Keep the KV of the common prefix, but always re-decode the last prompt token for its logits.
        keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1) if slot.scope == scope else 0
        # What the slot is about to lose is saved first, found later by its tokens (before the trim below).
        self._save(slot, len(slot.cached) - keep)
        restored = self._restore(slot, found, prompt, keep)
        copied = not restored and self._copy_prefix(slot, prompt, scope, keep)
        if restored or copied:
            keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1)
        if keep < len(slot.cached) and not llc.llama_memory_seq_rm(self._mem, slot.id, keep, -1):
            self._wipe(slot)  # a partial removal can fail (recurrent models); a whole one cannot
            keep = 0
        del slot.cached[keep:]
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

    def _seq_state(self, seq: int) -> State | None:
        """A copy of one sequence's KV state (its used cells only), or None if llama.cpp cannot give it."""
        llc = self._llc
        size = int(llc.llama_state_seq_get_size(self._ctx, seq))
        if size <= 0:
            return None
        buf = (ctypes.c_uint8 * size)()
        if llc.llama_state_seq_get_data(self._ctx, buf, size, seq) != size:
            log.warning("llama.cpp could not copy sequence %d's state", seq)
            return None
        return buf

    def _save(self, slot: Slot, lost: int) -> None:
        """Keep the slot's sequence state, found later by its tokens: in RAM, spilling the oldest to disk."""
        if lost < MIN_SAVED_TOKENS or not slot.savable or not self.prompt_cache.enabled:
            return
        buf = self._seq_state(slot.id)
        if buf is None:
            return
        # A copy of cached: the slot's list changes with the next trim and decode.
        if self.prompt_cache.put(list(slot.cached), buf, slot.scope, slot.session_id):
            self.stats["saved_states"] += 1

    def forget(self, session_id: str) -> None:
        """A reset: drop the states only the session reached now, and its slot's claim at the next step.

        A turn of the session that is still waiting (queued before the reset) runs for its client, but
        as no session's: its KV, the forgotten conversation, must not be kept under the session.
        """
        with self._forget_lock:
            # The scheduler reads a job's session only after taking it off the queue.
            self._forgotten[session_id] = self._jobs.unclaim(session_id)
        self.prompt_cache.forget(session_id)

    def _apply_forgets(self) -> dict[str, int]:
        """Scheduler thread: slots of forgotten sessions stop being theirs (so their KV is never saved).

        Returns the sessions forgotten since the last call, each with the last job number submitted
        before its reset, for the job being admitted (taken off the queue before `forget` looked).
        """
        with self._forget_lock:
            forgotten, self._forgotten = self._forgotten, {}
        for session in forgotten:
            self.prompt_cache.forget(session)  # again: a spill racing the reset may have written it since
        for slot in self._slots:
            if slot.session_id in forgotten:
                slot.session_id, slot.savable, slot.opening = None, False, []
        return forgotten

    def _persist(self) -> None:
        """Shutdown: write every state, RAM cache and slots alike, to disk (oldest first)."""
        cache = self.prompt_cache
        if cache.disk is None:
            return
        self._apply_forgets()
        entries = cache.drain()
        for slot in sorted(self._slots, key=lambda s: s.last_used):
            if slot.savable and len(slot.cached) >= MIN_SAVED_TOKENS:
                buf = self._seq_state(slot.id)
                if buf is not None:
                    entries.append(cache.entry(list(slot.cached), buf, slot.scope, slot.session_id))
        cache.persist(entries)

    def _restore(self, slot: Slot, found: Found | None, prompt: Sequence[int], keep: int) -> bool:
        """Put the saved state sharing the longest prefix with the prompt into the slot, if it beats `keep`.

        A state the prompt uses whole leaves the cache (the slot holds it now, and saves it again,
        longer, when it is next taken); one the prompt shares only part of stays for its own
        conversation, and the slot keeps a trimmed copy.
        """
        # Found before _save ran: the slot's own state shares at most `keep` tokens, so it cannot beat
        # the found one, and an entry that moved to disk since is read from there by its key.
        if found is None or min(found.common, len(prompt) - 1) <= keep:
            return False
        buf = self.prompt_cache.read(found, take=found.common >= len(found.tokens))
        if buf is None:
            return False
        loaded = self._load_state(slot, list(found.tokens), buf)  # a copy: the entry may stay cached
        if loaded:
            self.stats[f"restored_bytes_{self.prompt_cache.taken_from}"] += len(buf)
        return loaded

    def _load_state(self, slot: Slot, tokens: list[int], buf: State) -> bool:
        """Replace the slot's sequence with a saved state of `tokens`; on failure the slot is left empty."""
        self._wipe(slot)  # a state is restored into an empty sequence
        if self._llc.llama_state_seq_set_data(self._ctx, buf, len(buf), slot.id) == 0:
            log.warning("llama.cpp could not restore a sequence state into sequence %d; prefilling", slot.id)
            self._wipe(slot)  # a failed restore may leave part of the state behind
            return False
        slot.cached = tokens  # invariant 2: exactly the tokens whose KV was saved
        return True

    def _copy_prefix(self, slot: Slot, prompt: Sequence[int], scope: str, keep: int) -> bool:
        """Copy another slot's KV into this one when it shares at least MIN_COPIED_TOKENS more of the prompt.

        The other slot keeps its cache (a conversation sharing only a system prompt evicts nobody),
        and this one starts from the shared prefix instead of prefilling it. The copy goes through
        the sequence-state API, which moves only the source's used cells (llama_memory_seq_cp
        across KV streams would copy the whole stream). The source may be mid-generation: between
        steps its `cached` matches its KV exactly (invariant 2).
        """
        best, common = None, keep
        for other in self._slots:
            if other is not slot and other.scope == scope:
                c = min(common_prefix(other.cached, prompt), len(prompt) - 1)
                if c > common:
                    best, common = other, c
        if best is None or common - keep < MIN_COPIED_TOKENS:
            return False
        buf = self._seq_state(best.id)
        # A copy of cached: the source slot's list goes on changing. _start trims this one to the prefix.
        return buf is not None and self._load_state(slot, list(best.cached), buf)

    def _compact(self) -> None:
        """Move active slots into the free ones between them, so that a decode is a single ubatch.

        With one KV stream per sequence, llama.cpp splits a batch into one ubatch per run of
        consecutive sequence ids, and each ubatch is a pass over all the weights (invariant 8).
        """
        while (pair := compaction_swap(self._slots)) is not None:
            if not self._swap(*pair):
                return

    def _swap(self, x: Slot, y: Slot) -> bool:
        """Exchange two slots' sequences: each KV state is copied to the other's id, and the ids swapped.

        Everything else a slot holds (its job, tokens, sampler, session) stays with its object, so
        neither slot loses its cache and a generation goes on unchanged. False if nothing moved.
        """
        llc = self._llc
        states = [self._seq_state(s.id) if s.cached else None for s in (x, y)]
        if any(s.cached and state is None for s, state in zip((x, y), states, strict=True)):
            return False
        for s in (x, y):
            llc.llama_memory_seq_rm(self._mem, s.id, -1, -1)
        x.id, y.id = y.id, x.id
        self._slots.sort(key=lambda s: s.id)
        for s, state in zip((x, y), states, strict=True):
            if state is not None and llc.llama_state_seq_set_data(self._ctx, state, len(state), s.id) == 0:
                log.warning("llama.cpp could not move a sequence state into sequence %d", s.id)
                self._wipe(s)
                if s.job is not None:
                    s.job.fail(EngineError("generation failed: its KV cache could not be moved"))
                    self._release(s)
        self.stats["moved_slots"] += 1
        return True

    def _step(self) -> None:
        """One llama_decode: a token per generating slot, then prompt chunks; then sample."""
        batch = self._batch
        batch.clear()
        plan = [(row, batch.add(row.slot, row.tokens, row.logits)) for row in plan_step(self._active(), batch.capacity)]
        rc = batch.decode(self._ctx)
        if rc != 0:
            raise EngineError(f"llama_decode failed (code {rc})")
        self.stats["steps"] += 1
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
        batch = self._batch
        batch.clear()
        slots: list[Slot] = []
        for slot in self._slots:
            if slot.opening and slot.job is None and batch.n_tokens + len(slot.opening) <= batch.capacity:
                batch.add(slot, slot.opening, logits_last=False)
                slots.append(slot)
        if not slots:
            return
        try:
            rc = batch.decode(self._ctx)
        except Exception:  # the scheduler must survive it: the slots are wiped below
            log.exception("llama_decode of turn openings failed")
            rc = -1
        else:
            if rc != 0:
                log.warning("llama_decode of turn openings failed (code %d)", rc)
        for slot in slots:
            if rc != 0:
                self._wipe(slot)  # invariant 2: a failed decode leaves no partial sequence behind
                continue
            slot.cached.extend(slot.opening)
            self.stats["ahead_tokens"] += len(slot.opening)
            slot.opening = []

    def _release(self, slot: Slot) -> None:
        if slot.sampler is not None:
            slot.sampler.free()
        slot.job, slot.sampler, slot.decoder, slot.next_token = None, None, None, None
        slot.pending, slot.opening = [], []
        slot.last_used = next(self._ticks)

    def _wipe(self, slot: Slot) -> None:
        self._llc.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        slot.cached.clear()
        slot.opening = []
