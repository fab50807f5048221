"""The llama.cpp engine: GGUF models on CPU through llama-cpp-python's C API, with slots,
continuous batching and prefix reuse (the design of llama.cpp's own server, in Python).

One llama context holds `n_parallel` KV sequences ("slots"); the total context is split so that
each slot owns `n_ctx / n_parallel` cells and one conversation can never crowd out another.
One scheduler thread owns the context, the batch and the samplers. Each step it admits waiting
jobs into free slots, moves the active slots next to each other, builds one batch (a decode
token per generating slot, then prompt chunks for slots still prefilling), calls `llama_decode`
once, and samples every slot that has logits with that request's own sampler chain.

Scheduler invariants:
1. Only the scheduler thread calls into the context, the batch and the samplers; request threads
   only tokenize (the vocabulary is read-only) and put jobs on the bounded waiting queue. This is
   for speed too: llama.cpp's OpenMP build keeps a thread team per thread that ever decoded, and
   measured on 2 cores a second team, even idle, made the first one's decode 30-50% slower.
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
7. A saved sequence state (below) holds exactly the KV of its `tokens`, copied while invariant 2
   held; a session's state is in the RAM cache or on disk only while no slot has been admitted
   for it since, and the RAM cache's total bytes never exceed `kv_cache_mb` (nor the folder's
   `kv_disk_mb`). The cache and the folder are guarded by `_saved_lock`, because a reset on a
   request thread drops a session's states at once (`forget`). After a reset no slot keeps KV
   under the session for a turn that began before it: slots lose the claim at the next admission,
   and a turn still queued at the reset is admitted as no session's.
8. `self._slots` is ordered by `id`, a slot's sequence id. Ids change only in `_swap`, between
   steps, and the KV moves with them. Before every decode `_compact` has given the active slots
   consecutive ids (unless llama.cpp refused to copy a state).
9. `slot.opening` is non-empty only on a free slot whose last reply ended (at end of turn or at
   max_tokens; then the reply's last token, emitted but not decoded, comes first). It is
   decoded (at positions `len(cached)` on) only after the scheduler has waited AHEAD_IDLE_SECONDS
   with nothing to do, and dropped when the slot is taken, wiped or its session forgotten.

Saved states: a slot that last served a session is taken over by another request when the slots
run out, and its history would then be prefilled again on that session's next turn. So before a
slot's KV is trimmed for a different session, `llama_state_seq_get_data` copies its sequence into
an LRU cache in RAM keyed by session id (bounded by bytes; the oldest states go first). When the
session comes back and its saved state shares more of the prompt than the slot chosen for it, the
state is copied back into that slot (`llama_state_seq_set_data`, a memcpy instead of a prefill)
and the usual trim-and-prefill goes on from there. States the RAM cache drops (the oldest, or
one larger than it) go to a bounded folder beside the sessions database (`_state_files`), and at
shutdown every session's state is written there, so a session's next turn after a restart is
restored too. A state is used only through its common token prefix with the new prompt, so a
stale one can never change an answer.

Shared prefixes: a new conversation usually shares its system prompt (and template header) with
another slot's. Rather than take that slot over (throwing its history away) or prefill the prefix
again, `_copy_prefix` copies the other slot's sequence state into the chosen slot and trims it to
the shared prefix; the source slot is untouched, even if it is mid-generation (between steps its
`cached` matches its KV, invariant 2).

Turn openings: a finished reply is usually followed by the same conversation's next turn, whose
prompt goes on after the reply with the template's closing and next header
(ChatML: `<|im_end|>\\n<|im_start|>user\\n`, 5 of the ~24 tokens a short turn adds). Those
tokens are known as soon as the reply ends, so once the server has been idle for a moment (a
person reading the reply) they are decoded into the slot, and the next turn finds them in its
common prefix. A next prompt that goes on differently only trims them again. Never while other
work waits: a request that arrives during that decode waits for one small batch at most.

Batching and prefix reuse change only how the same tokens are grouped into llama_decode calls.
Whether that leaves greedy output bit-identical depends on llama.cpp's CPU kernels for the
model's tensor types: measured with flash attention, SmolLM2 (Q4_1) gives identical logits for
any grouping, while Qwen2.5-Coder (Q5_0/Q4_K/Q6_K/Q8_0 go through repacked and tiled GEMM
kernels) moves logits by up to ~0.5 with the number of rows per matmul, which flips near-tie
tokens now and then.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import itertools
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRequest, Cancelled, ContextOverflow, EngineError, ModelLoadError, NotReady, Overloaded
from ..models.resolve import ResolvedModel, check_gguf
from ._llama_model import LlamaModel
from ._state_files import StateFiles, fingerprint
from .base import Chunk, Engine, GenerationRequest, Message, QueuedEngine, SamplingParams, _Job

log = logging.getLogger(__name__)

CPU_CONTEXT_CAP = 8192  # per-slot default cap, as the transformers engine caps CPU contexts
PENALTY_LAST_N = 64  # tokens the repeat/presence/frequency penalties look back over (llama.cpp's default)
# A slot losing fewer tokens than this is not saved: re-prefilling so few is cheap, the RAM better spent.
MIN_SAVED_TOKENS = 16
# A prefix another slot holds is copied (a memcpy of its KV) when it spares at least this much prefill.
MIN_COPIED_TOKENS = 16
# Idle this long after a reply ends, the scheduler decodes the opening of the conversation's next turn.
# Longer than a client takes to send its next request, far shorter than a person takes to write one.
AHEAD_IDLE_SECONDS = 0.1


def _cpu_count() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _SessionJob(_Job):
    """A job and the session whose KV it may keep: none once that session is reset before it starts."""

    def __init__(self, request: GenerationRequest, number: int):
        super().__init__(request)
        self.session = request.session_id
        self.number = number  # submission order


@dataclass
class _Slot:
    """One KV sequence and the job (if any) that is using it."""

    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    session_id: str | None = None  # the session last served, for affinity
    last_used: int = 0  # scheduler tick of the last admission or release (LRU)
    job: _SessionJob | None = None
    admitted: int = 0  # admission order, for fair prefill
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_token: int | None = None  # sampled, emitted, not yet decoded
    opening: list[int] = field(default_factory=list)  # the next turn's opening, to decode when idle
    generated: int = 0
    sampler: Any = None
    decoder: Any = None  # incremental UTF-8 decoder: holds back an incomplete character


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
        self._ctx = ctx
        self.model_name = model_name
        self.device = "cpu"
        self._mem = llc.llama_get_memory(ctx)
        self.n_ctx = int(llc.llama_n_ctx(ctx))
        self.context_length = int(llc.llama_n_ctx_seq(ctx))
        self._memory = file_size + self.n_ctx * model.kv_bytes_per_token()
        self._n_batch = n_batch
        self._batch = llc.llama_batch_init(n_batch, 0, 1)
        self._opening = model.turn_opening()[: n_batch // 2]
        self._slots = [_Slot(i) for i in range(int(llc.llama_n_seq_max(ctx)))]
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
            "restored_tokens_ram": 0,
            "restored_tokens_disk": 0,
            "restored_bytes_ram": 0,
            "restored_bytes_disk": 0,
        }
        self._taken_from = "ram"  # where _take_saved found the last state (scheduler thread only)
        # Saved sequence states, oldest first: session id -> (tokens, the state's bytes). Scheduler
        # thread only (invariant 7); a ctypes array, so that restoring needs no extra copy.
        self._saved: OrderedDict[str, tuple[list[int], ctypes.Array[ctypes.c_uint8]]] = OrderedDict()
        self._saved_bytes = 0
        self._saved_limit = kv_cache_mb * 1024 * 1024
        self._disk = disk  # states that leave RAM, and every session's state at shutdown
        # Sessions reset since the scheduler's last admission -> the last job number submitted before.
        self._forgotten: dict[str, int] = {}
        # Guards _saved, _saved_bytes, _forgotten and the disk folder: forget() runs on request threads.
        self._saved_lock = threading.Lock()
        # Bounded so that overload is answered with 503 at once instead of an ever-growing wait.
        self._jobs: queue.Queue[_SessionJob | None] = queue.Queue(maxsize=max_queue)
        # Set once by close(): generate() refuses new work and the scheduler winds down.
        self._closed = threading.Event()
        # Orders generate()'s enqueue against close(), so no job slips in after close's final drain,
        # and against forget(), which must see every job submitted before it (numbered in order).
        self._submit_lock = threading.Lock()
        self._submitted = 0
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

        kv_cache_mb bounds the RAM that evicted sessions' KV states may take (0: none are kept);
        kv_disk_mb the disk they spill to under state_dir, where every session's state is also
        written at close, so that it survives a restart (0 or no state_dir: not on disk).

        Flash attention (llama.cpp's default on CPU) is about 25% faster on SmolLM2 and, measured
        there, makes a sequence's logits independent of what else shares its batch; without it the
        attention kernels round differently for different batch shapes.
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
            key = fingerprint(path, llc.__version__, flash_attn)
            try:
                disk = StateFiles(state_dir / key, kv_disk_mb * 1024 * 1024)
            except OSError as exc:
                log.warning("KV states stay in RAM only: cannot use %s (%s)", state_dir, exc)
        engine = cls(model, ctx, resolved.name, path.stat().st_size, n_batch, max_queue, kv_cache_mb, disk)
        log.info("loaded %s: %d slots of %d tokens", resolved.name, n_parallel, engine.context_length)
        return engine

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        return self.model.encode_chat(messages)

    def memory_allocated(self) -> int:
        """The model file's size, the KV cache, and the sessions' states kept in RAM."""
        return self._memory + self._saved_bytes

    @property
    def saved_state_bytes(self) -> int:
        """Bytes of sequence states now in the RAM cache (never above kv_cache_mb)."""
        return self._saved_bytes

    def ready(self) -> bool:
        return self._thread.is_alive() and not self._closed.is_set()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "parallel": len(self._slots)}

    def metrics(self) -> dict[str, float]:
        # Read without the scheduler's cooperation: each value is one int, so a scrape sees a recent one.
        active = sum(1 for s in self._slots if s.job is not None)
        stats = self.stats
        with self._saved_lock:  # guards the disk folder
            disk_bytes = self._disk.total_bytes() if self._disk is not None else 0
        return {
            "slots_active": active,
            "slots_free": len(self._slots) - active,
            "kv_cache_hits_total": stats["kv_cache_hits"],
            "reused_tokens_total": stats["reused_tokens"],
            "restored_tokens_ram_total": stats["restored_tokens_ram"],
            "restored_tokens_disk_total": stats["restored_tokens_disk"],
            "restored_bytes_ram_total": stats["restored_bytes_ram"],
            "restored_bytes_disk_total": stats["restored_bytes_disk"],
            "saved_state_bytes_ram": self._saved_bytes,
            "saved_state_bytes_disk": disk_bytes,
        }

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if not request.prompt_ids:
            raise BadRequest("the prompt is empty", param="messages")
        if len(request.prompt_ids) >= self.context_length:
            raise ContextOverflow(
                f"the prompt is {len(request.prompt_ids)} tokens but the context is {self.context_length} tokens"
            )
        with self._submit_lock:
            if not self.ready():
                raise NotReady("the model is not loaded")
            self._submitted += 1
            job = _SessionJob(request, self._submitted)
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                raise Overloaded("server busy: the generation queue is full, retry later") from None
        return QueuedEngine._read(job)

    def close(self) -> None:
        with self._submit_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._fail_waiting()
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)  # wake the scheduler if it waits for work
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # still inside llama_decode: freeing now would crash it
            log.warning("llama.cpp scheduler did not stop; leaving its memory allocated")
            return
        self._fail_waiting()
        for slot in self._slots:
            if slot.job is not None:
                slot.job.fail(Cancelled("server shutting down"))
            self._release(slot)
        try:
            self._persist()
        except Exception:  # a full disk must not stop the shutdown
            log.exception("could not write the sessions' KV states")
        with self._saved_lock:
            self._saved.clear()
            self._saved_bytes = 0
        self._llc.llama_batch_free(self._batch)
        self._llc.llama_free(self._ctx)
        self.model.free()

    def _fail_waiting(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.fail(Cancelled("server shutting down"))

    # --- the scheduler thread ---

    def _loop(self) -> None:
        while not self._closed.is_set():
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

    def _active(self) -> list[_Slot]:
        return [s for s in self._slots if s.job is not None]

    def _admit(self) -> bool:
        """Move waiting jobs into free slots; block only when nothing is running. False: shut down."""
        while True:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return True
            try:
                if self._active():
                    job = self._jobs.get_nowait()
                elif any(s.opening for s in self._slots):
                    job = self._jobs.get(timeout=AHEAD_IDLE_SECONDS)
                else:
                    job = self._jobs.get()
            except queue.Empty:
                if not self._active():
                    self._decode_openings()  # idle for a while: nobody waits for this decode
                return True
            if job is None or self._closed.is_set():
                if job is not None:
                    job.fail(Cancelled("server shutting down"))
                return False
            if job.request.cancel.is_set():
                job.fail(Cancelled("cancelled before it started"))
                continue
            forgotten = self._apply_forgets()  # before a slot is picked by its session
            if job.session in forgotten and job.number <= forgotten[job.session]:
                job.session = None  # submitted before its session's reset: its KV is not the session's
            slot = self._pick(free, job)
            try:
                self._start(slot, job)
            except Exception as exc:  # one bad admission must not stop the scheduler
                log.exception("llama.cpp admission failed")
                job.fail(EngineError(f"generation failed: {exc}"))
                self._wipe(slot)
                self._release(slot)

    def _pick(self, free: list[_Slot], job: _SessionJob) -> _Slot:
        """Choose a free slot for a prompt, keeping as much useful KV cache as possible.

        The slot that last served this session wins. Else, when the session's saved state shares
        more of the prompt than any free slot, the slot whose cache is cheapest to lose (it is
        overwritten by the restore). Else the slot with the longest common prefix, if reusing it
        throws nothing away (it holds the whole prompt, so what follows is only an earlier reply
        to it, or its cache ends inside the prompt). Else, when some slot shares a prefix worth
        copying, the cheapest slot (`_start` copies the prefix into it, and the other slot keeps
        its history). Else the slot that saves more prefill than it throws away, else an empty
        slot, else the least recently used one.
        """
        prompt, session = job.request.prompt_ids, job.session
        cheapest = min(free, key=lambda s: (len(s.cached) > 0, s.last_used))
        if session is not None:
            for slot in free:
                if slot.session_id == session:
                    return slot
        # Each slot's common prefix with the prompt, busy slots too (a prefix to copy from).
        commons = {s.id: _common_prefix(s.cached, prompt) for s in self._slots}
        if session is not None:
            saved = self._saved_tokens(session)
            if saved is not None:
                restorable = _common_prefix(saved, prompt)
                if all(commons[s.id] < restorable for s in free):
                    return cheapest

        def lost(slot: _Slot) -> int:
            if commons[slot.id] >= len(prompt) - 1:
                # The whole prompt is cached: what follows it is an earlier reply to this very
                # prompt (a regenerate or a repeat), which the new reply replaces, not a history.
                return 0
            return len(slot.cached) - commons[slot.id]

        keeping = [s for s in free if commons[s.id] > 0 and lost(s) == 0]
        if keeping:
            return max(keeping, key=lambda s: (commons[s.id], -s.last_used))
        if max(commons.values()) - commons[cheapest.id] >= MIN_COPIED_TOKENS:
            return cheapest  # _start copies the shared prefix into it; the other slot keeps its history
        best = max(free, key=lambda s: (commons[s.id] - lost(s), -s.last_used))
        return best if commons[best.id] > lost(best) else cheapest

    def _start(self, slot: _Slot, job: _SessionJob) -> None:
        llc, prompt, session = self._llc, job.request.prompt_ids, job.session
        # Keep the KV of the common prefix, but always re-decode the last prompt token for its logits.
        keep = min(_common_prefix(slot.cached, prompt), len(prompt) - 1)
        if slot.session_id is not None and slot.session_id != session:
            # The slot's session loses it: keep its history for its next turn (before the trim below).
            self._save(slot, len(slot.cached) - keep)
        restored = self._restore(slot, session, prompt, keep)
        copied = not restored and self._copy_prefix(slot, prompt, keep)
        if restored or copied:
            keep = min(_common_prefix(slot.cached, prompt), len(prompt) - 1)
        if keep < len(slot.cached) and not llc.llama_memory_seq_rm(self._mem, slot.id, keep, -1):
            self._wipe(slot)  # a partial removal can fail (recurrent models); a whole one cannot
            keep = 0
        del slot.cached[keep:]
        self.stats["reused_tokens"] += keep
        self.stats["kv_cache_hits"] += keep > 0
        if restored:
            self.stats["restored_tokens"] += keep
            self.stats[f"restored_tokens_{self._taken_from}"] += keep
        elif copied:
            self.stats["copied_tokens"] += keep
        slot.job, slot.session_id, slot.opening = job, session, []
        job.cached_tokens = keep
        slot.admitted = slot.last_used = next(self._ticks)
        slot.pending = list(prompt[keep:])
        slot.next_token, slot.generated = None, 0
        slot.sampler = self._make_sampler(job.request.params)
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _seq_state(self, seq: int) -> ctypes.Array[ctypes.c_uint8] | None:
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

    def _save(self, slot: _Slot, lost: int) -> None:
        """Keep the slot's sequence state under its session: in RAM, spilling the oldest to disk."""
        session = slot.session_id
        if session is None or lost < MIN_SAVED_TOKENS or (self._saved_limit <= 0 and self._disk is None):
            return
        buf = self._seq_state(slot.id)
        if buf is None:
            return
        # A copy of cached: the slot's list changes with the next trim and decode.
        self._keep(session, list(slot.cached), buf)
        self.stats["saved_states"] += 1

    def _keep(self, session: str, tokens: list[int], buf: ctypes.Array[ctypes.c_uint8]) -> None:
        spill: list[tuple[str, list[int], ctypes.Array[ctypes.c_uint8]]] = []
        with self._saved_lock:
            self._drop_saved(session)
            if len(buf) <= self._saved_limit:
                while self._saved and self._saved_bytes + len(buf) > self._saved_limit:
                    oldest = next(iter(self._saved))
                    spill.append((oldest, *self._saved.pop(oldest)))
                    self._saved_bytes -= len(spill[-1][2])
                self._saved[session] = (tokens, buf)
                self._saved_bytes += len(buf)
            else:  # larger than the whole RAM cache
                spill.append((session, tokens, buf))
            if self._disk is not None:
                for entry in spill:
                    self._disk.put(*entry)

    def _drop_saved(self, session: str) -> tuple[list[int], ctypes.Array[ctypes.c_uint8]] | None:
        """Take the session's state out of the RAM cache (the caller holds _saved_lock)."""
        entry = self._saved.pop(session, None)
        if entry is not None:
            self._saved_bytes -= len(entry[1])
        return entry

    def _saved_tokens(self, session: str) -> list[int] | None:
        """The tokens of the session's saved state, in RAM or on disk."""
        with self._saved_lock:
            entry = self._saved.get(session)
            if entry is not None:
                return entry[0]
            return self._disk.tokens(session) if self._disk is not None else None

    def _take_saved(self, session: str) -> tuple[list[int], ctypes.Array[ctypes.c_uint8]] | None:
        """Remove the session's saved state (RAM first, else disk) and return it."""
        with self._saved_lock:
            entry = self._drop_saved(session)
            self._taken_from = "ram"
            if self._disk is not None:
                if entry is None:
                    self._taken_from = "disk"
                    return self._disk.take(session)
                self._disk.drop(session)  # older than the RAM copy
            return entry

    def forget(self, session_id: str) -> None:
        """A reset: drop the session's saved states now, and its slot's claim at the scheduler's next step.

        A turn of the session that is still waiting (queued before the reset) runs for its client, but
        as no session's: its KV, the forgotten conversation, must not be kept under the session.
        """
        with self._saved_lock:
            self._drop_saved(session_id)
            if self._disk is not None:
                self._disk.drop(session_id)
            # No job is between numbering and the queue while the submit lock is held; the
            # scheduler reads a job's session only after taking it off the queue.
            with self._submit_lock, self._jobs.mutex:
                self._forgotten[session_id] = self._submitted
                for job in self._jobs.queue:
                    if job is not None and job.session == session_id:
                        job.session = None

    def _apply_forgets(self) -> dict[str, int]:
        """Scheduler thread: slots of forgotten sessions stop being theirs (so their KV is never saved).

        Returns the sessions forgotten since the last call, each with the last job number submitted
        before its reset, for the job being admitted (taken off the queue before `forget` looked).
        """
        with self._saved_lock:
            forgotten, self._forgotten = self._forgotten, {}
        for slot in self._slots:
            if slot.session_id in forgotten:
                slot.session_id, slot.opening = None, []
        return forgotten

    def _persist(self) -> None:
        """Shutdown: write every session's state, RAM cache and slots alike, to disk (oldest first)."""
        if self._disk is None:
            return
        self._apply_forgets()
        with self._saved_lock:
            states = [(session, tokens, buf) for session, (tokens, buf) in self._saved.items()]
        for slot in sorted(self._slots, key=lambda s: s.last_used):
            if slot.session_id is not None and len(slot.cached) >= MIN_SAVED_TOKENS:
                buf = self._seq_state(slot.id)
                if buf is not None:
                    states.append((slot.session_id, list(slot.cached), buf))
        with self._saved_lock:
            for entry in states:
                self._disk.put(*entry)

    def _restore(self, slot: _Slot, session: str | None, prompt: Sequence[int], keep: int) -> bool:
        """Put the session's saved state into the slot if it covers more of the prompt than `keep`.

        The saved entry is dropped either way: the slot now serves the session, and its KV (restored
        or newer) supersedes the saved copy.
        """
        entry = self._take_saved(session) if session is not None else None
        if entry is None:
            return False
        tokens, buf = entry
        if min(_common_prefix(tokens, prompt), len(prompt) - 1) <= keep:
            return False
        loaded = self._load_state(slot, tokens, buf)
        if loaded:
            self.stats[f"restored_bytes_{self._taken_from}"] += len(buf)
        return loaded

    def _load_state(self, slot: _Slot, tokens: list[int], buf: ctypes.Array[ctypes.c_uint8]) -> bool:
        """Replace the slot's sequence with a saved state of `tokens`; on failure the slot is left empty."""
        self._wipe(slot)  # a state is restored into an empty sequence
        if self._llc.llama_state_seq_set_data(self._ctx, buf, len(buf), slot.id) == 0:
            log.warning("llama.cpp could not restore a sequence state into sequence %d; prefilling", slot.id)
            self._wipe(slot)  # a failed restore may leave part of the state behind
            return False
        slot.cached = tokens  # invariant 2: exactly the tokens whose KV was saved
        return True

    def _copy_prefix(self, slot: _Slot, prompt: Sequence[int], keep: int) -> bool:
        """Copy another slot's KV into this one when it shares at least MIN_COPIED_TOKENS more of the prompt.

        The other slot keeps its cache (a conversation sharing only a system prompt evicts nobody),
        and this one starts from the shared prefix instead of prefilling it. The copy goes through
        the sequence-state API, which moves only the source's used cells (llama_memory_seq_cp
        across KV streams would copy the whole stream). The source may be mid-generation: between
        steps its `cached` matches its KV exactly (invariant 2).
        """
        best, common = None, keep
        for other in self._slots:
            if other is not slot:
                c = min(_common_prefix(other.cached, prompt), len(prompt) - 1)
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
        consecutive sequence ids, and each ubatch is a pass over all the weights: measured on Qwen,
        decoding a token for sequences 0, 2, 4 and 6 takes 85 ms against 52 ms for 0 to 3. So while
        a free slot lies between active ones, an active slot at one end trades places with the hole
        nearest the other end (invariant 8): the highest with the lowest hole, or the lowest with the
        highest hole, whichever pair holds fewer tokens to copy.
        """
        while True:
            active = [s.id for s in self._slots if s.job is not None]
            if len(active) < 2 or active[-1] - active[0] + 1 == len(active):
                return
            holes = [i for i in range(active[0], active[-1]) if self._slots[i].job is None]
            pairs = [(self._slots[active[-1]], self._slots[holes[0]]), (self._slots[active[0]], self._slots[holes[-1]])]
            x, y = min(pairs, key=lambda pair: len(pair[0].cached) + len(pair[1].cached))
            if not self._swap(x, y):
                return

    def _swap(self, x: _Slot, y: _Slot) -> bool:
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

    def _make_sampler(self, p: SamplingParams) -> Any:
        llc = self._llc
        chain = llc.llama_sampler_chain_init(llc.llama_sampler_chain_default_params())
        # The order of llama.cpp's own common sampler: penalties, then the truncations, then temperature.
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            n_vocab = llc.llama_vocab_n_tokens(self.model.vocab)
            penalties = llc.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
            )
            llc.llama_sampler_chain_add(chain, penalties)
        if p.temperature <= 0:
            llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_min_p(p.min_p, 1))
        llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_temp(p.temperature))
        seed = llc.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
        llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_dist(seed))
        return chain

    def _step(self) -> None:
        """One llama_decode: a token per generating slot, then prompt chunks; then sample."""
        llc, batch = self._llc, self._batch
        active = self._active()
        work: dict[int, tuple[_Slot, list[int], bool]] = {}  # slot id -> (slot, tokens, prefill?)
        for slot in active:
            if slot.next_token is not None:
                work[slot.id] = (slot, [slot.next_token], False)
        budget = self._n_batch - len(work)
        for slot in sorted((s for s in active if s.pending), key=lambda s: s.admitted):
            if budget <= 0:
                break
            work[slot.id] = (slot, slot.pending[:budget], True)
            budget -= len(work[slot.id][1])
        # In sequence order: llama.cpp splits a batch into one ubatch per run of consecutive
        # sequence ids, taken in batch order (see _compact).
        plan: list[tuple[_Slot, list[int], bool, int]] = []  # (slot, tokens, prefill?, output index or -1)
        n = 0
        for seq in sorted(work):
            slot, tokens, prefill = work[seq]
            logits_last = not prefill or len(tokens) == len(slot.pending)
            n = self._add_to_batch(n, slot, tokens, logits_last)
            plan.append((slot, tokens, prefill, n - 1 if logits_last else -1))
        batch.n_tokens = n
        rc = llc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed (code {rc})")
        self.stats["steps"] += 1
        for slot, tokens, prefill, out in plan:
            slot.cached.extend(tokens)
            if prefill:
                del slot.pending[: len(tokens)]
                self.stats["prefilled_tokens"] += len(tokens)
            if out >= 0:
                self._accept(slot, int(llc.llama_sampler_sample(slot.sampler, self._ctx, out)))

    def _add_to_batch(self, n: int, slot: _Slot, tokens: list[int], logits_last: bool) -> int:
        """Put tokens of the slot's sequence at batch rows n.., after its cached ones; the next free row."""
        batch, base = self._batch, len(slot.cached)
        for j, tok in enumerate(tokens):
            batch.token[n] = tok
            batch.pos[n] = base + j
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.id
            batch.logits[n] = logits_last and j == len(tokens) - 1
            n += 1
        return n

    def _accept(self, slot: _Slot, token: int) -> None:
        """Handle a sampled token: stop on end-of-generation, else emit its text and queue its decode."""
        job = slot.job
        assert job is not None  # only active slots are sampled
        slot.next_token = None
        if self.model.is_eog(token):
            return self._finish(slot, "stop")
        slot.generated += 1
        self.stats["generated_tokens"] += 1
        job.emit(slot.decoder.decode(self.model.piece(token)), slot.generated)
        if slot.generated >= job.request.params.max_tokens or len(slot.cached) >= self.context_length:
            return self._finish(slot, "length", token)
        slot.next_token = token

    def _finish(self, slot: _Slot, reason: str, undecoded: int | None = None) -> None:
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
        llc, batch = self._llc, self._batch
        slots: list[_Slot] = []
        n = 0
        for slot in self._slots:
            if slot.opening and slot.job is None and n + len(slot.opening) <= self._n_batch:
                n = self._add_to_batch(n, slot, slot.opening, logits_last=False)
                slots.append(slot)
        if not slots:
            return
        batch.n_tokens = n
        try:
            rc = llc.llama_decode(self._ctx, batch)
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

    def _release(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self._llc.llama_sampler_free(slot.sampler)
        slot.job, slot.sampler, slot.decoder, slot.next_token = None, None, None, None
        slot.pending, slot.opening = [], []
        slot.last_used = next(self._ticks)

    def _wipe(self, slot: _Slot) -> None:
        self._llc.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        slot.cached.clear()
        slot.opening = []
