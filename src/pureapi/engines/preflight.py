"""Start-up check of the llama.cpp build: load the model and decode in a child process first.

llama-cpp-python compiles llama.cpp with `-march=native`. Some VMs advertise CPU features they do
not run (AMX on cloud Xeons): the first `llama_decode` then dies with SIGILL or SIGSEGV, and a
server that decoded in its own process would vanish without a word. The child takes that death;
the server turns it into one line that says what happened and the command that fixes it. A build
that passed is remembered by the identity of its library files and the model file, so later starts
skip the child.

The server does not wait for the whole check: it loads the model itself once the child has loaded
it (a build that dies loading has killed the child by then) while the child decodes, and decodes
only after the child did (`start_check`, `Check.loaded`, `Check.decoded`).

`python -m pureapi.engines.preflight MODEL.gguf [--flash-attn on|off] [--threads N]` is the child.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..errors import ModelLoadError

# Stages the child reports on stdout, one line each, so the parent knows where a crash happened.
LOADED = "preflight: loaded"
DECODED = "preflight: decoded"
EXIT_ORPHANED = 5  # the child stopped because the server that started it is gone
CHILD_TIMEOUT_S = 600  # a 70B GGUF can take minutes to map; a hang beyond this is reported, not waited out

# /proc/cpuinfo flag -> ggml's CMake option: the build for exactly what this CPU lists, AMX left out.
# Each is set ON or OFF explicitly: with GGML_NATIVE=OFF, ggml turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C on
# by default, which a CPU without them cannot run either.
_CPU_FLAGS = {
    "sse4_2": "GGML_SSE42",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def cpu_flags() -> set[str]:
    """The feature flags the kernel lists for this CPU (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(flags: set[str]) -> str:
    """CMAKE_ARGS for a llama.cpp build that uses only the features this CPU lists, never AMX."""
    options = ["-DGGML_NATIVE=OFF"]
    options += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in _CPU_FLAGS.items()]
    return " ".join(options)


def fix_command(flags: set[str] | None = None) -> str:
    """The shell command that rebuilds llama-cpp-python for this CPU, bypassing pip's wheel cache."""
    version = _installed_version()
    package = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    args = cmake_args(cpu_flags() if flags is None else flags)
    # pip's wheel cache ignores CMAKE_ARGS, so without --no-cache-dir it would hand back the broken build.
    return f'CMAKE_ARGS="{args}" pip install --no-cache-dir --force-reinstall --no-deps {package}'


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def library_identity() -> list[tuple[str, int, int]]:
    """Name, size and mtime of every file of the installed llama_cpp package (its compiled libraries
    included): a rebuild or reinstall changes it. Found without importing the package."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    files: list[tuple[str, int, int]] = []
    for folder in spec.submodule_search_locations:
        for root, _dirs, names in os.walk(folder):
            for name in names:
                if name.endswith((".so", ".dylib", ".dll", ".py")) or ".so." in name:
                    path = Path(root, name)
                    st = path.stat()
                    files.append((str(path), st.st_size, st.st_mtime_ns))
    return sorted(files)


def shared_verdicts() -> Path:
    """Verdicts beside the installed build (under sys.prefix: a virtualenv's own folder), so every user
    and home of this install shares them; the key names the CPU, so a copied install is checked again."""
    return Path(sys.prefix) / "share" / "pureapi" / "preflight"


def _verdict_key(model: Path, flash_attn: bool, threads: int | None) -> str:
    st = model.stat()
    ident = {
        "library": library_identity(),
        "cpu": sorted(cpu_flags()),
        # A preloaded library replaces code the build runs (the tests' crashing ggml functions do).
        "preload": os.environ.get("LD_PRELOAD", ""),
        "model": [str(model.resolve()), st.st_size, st.st_mtime_ns],
        "flash_attn": flash_attn,
        "threads": threads,
        "python": sys.executable,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def start_check(model: Path, *, flash_attn: bool, threads: int | None, verdicts: Sequence[Path]) -> Check:
    """Start the check of `model` in a child process (nothing to start when one of `verdicts` holds a
    verdict; a new one goes to the first of them that can be written).

    The caller may load the model itself once `Check.loaded` returns, while the child decodes, and
    must not decode before `Check.decoded` returns: that is where a bad build crashes."""
    key = _verdict_key(model, flash_attn, threads)
    stamps = [folder / key for folder in verdicts]
    if any(stamp.is_file() for stamp in stamps):
        return Check(model, stamps, None)
    env = dict(os.environ)
    # The child must import this very pureapi, also when it runs from a plain checkout.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = child_command(model, flash_attn, threads)
    # The child's stdin is a pipe the server never writes to: it closes when the server exits, and
    # the child (--exit-with-parent) then stops too instead of decoding for nobody.
    proc = subprocess.Popen(
        [*cmd, "--exit-with-parent"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    return Check(model, stamps, proc)


def child_command(model: Path, flash_attn: bool, threads: int | None) -> list[str]:
    """The command line of the child that loads `model` and decodes, reporting its stages."""
    cmd = [sys.executable, "-m", "pureapi.engines.preflight", str(model), "--flash-attn", "on" if flash_attn else "off"]
    return cmd + (["--threads", str(threads)] if threads else [])


class Check:
    """A start-up check in flight: the child's stages as it reports them, and its verdict."""

    def __init__(self, model: Path, stamps: list[Path], proc: subprocess.Popen[str] | None):
        self.model, self.stamps, self.proc = model, stamps, proc
        self.stages: list[str] = []
        self._deadline = time.monotonic() + CHILD_TIMEOUT_S
        # The child's stdout, line by line, then None at its end: read on a thread so waits can time out.
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        if proc is not None and proc.stdout is not None:
            threading.Thread(target=self._read, args=(proc.stdout,), name="preflight-reader", daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _until(self, stage: str | None) -> None:
        """Read the child's stages until `stage` (None: until its end), killing it past the deadline."""
        while stage is None or stage not in self.stages:
            try:
                line = self._lines.get(timeout=max(0.0, self._deadline - time.monotonic()))
            except queue.Empty:
                self.cancel()
                raise ModelLoadError(
                    f"model file {self.model}: llama.cpp did not load it and decode a token within {CHILD_TIMEOUT_S} s"
                ) from None
            if line is None:
                self._lines.put(None)  # the end stays readable for a later wait
                return
            self.stages.append(line)

    def loaded(self) -> None:
        """Wait until the child has loaded the model; ModelLoadError (one line) if loading killed it."""
        if self.proc is not None:
            self._until(LOADED)
            if LOADED not in self.stages:
                self._verdict(self.proc)

    def decoded(self) -> bool:
        """Wait for the child's end; ModelLoadError (one line) if loading or decoding killed it.

        Returns whether it decoded. Errors that llama.cpp reports without crashing (a damaged file it
        refuses) return False and are left to the real load, which words them already."""
        if self.proc is None:
            return True
        self._until(None)
        return self._verdict(self.proc)

    def _verdict(self, proc: subprocess.Popen[str]) -> bool:
        returncode = proc.wait()
        if returncode < 0:
            crash = _signal_name(returncode)
            if LOADED not in self.stages:
                raise ModelLoadError(f"model file {self.model}: llama.cpp crashed ({crash}) while loading it")
            amx = " (this CPU lists AMX, which some VMs advertise but do not run)" if "amx_tile" in cpu_flags() else ""
            raise ModelLoadError(
                f"llama.cpp crashed ({crash}) at its first decode: the installed llama-cpp-python was built for "
                f"CPU instructions this machine cannot run{amx}; rebuild it for this CPU with: {fix_command()}"
            )
        if returncode == 0 and DECODED in self.stages:
            self._remember()
            return True
        return False

    def _remember(self) -> None:
        """Write the verdict to the first folder that takes it (none: the next start checks again)."""
        for stamp in self.stamps:
            try:
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text("\n".join(self.stages) + "\n")
                return
            except OSError:
                continue

    def cancel(self) -> None:
        """Stop the child (the start failed for another reason, or it ran out of time)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def check_llamacpp(model: Path, *, flash_attn: bool, threads: int | None, verdicts: Sequence[Path]) -> bool:
    """Raise ModelLoadError (one line) if loading `model` or decoding with it kills a process; the
    whole check, waited for (see `Check.decoded` for what it returns)."""
    return start_check(model, flash_attn=flash_attn, threads=threads, verdicts=verdicts).decoded()


def _child(model: str, flash_attn: bool, threads: int | None) -> int:
    """Load the model, decode a prompt and one more token, reporting each stage on stdout."""
    import ctypes

    import llama_cpp as llc

    quiet = llc.llama_log_callback(lambda level, text, user_data: None)
    llc.llama_log_set(quiet, ctypes.c_void_p(0))
    llc.llama_backend_init()
    mparams = llc.llama_model_default_params()
    mparams.n_gpu_layers = 0
    m = llc.llama_model_load_from_file(model.encode(), mparams)
    if not m:
        return 3  # refused, not crashed: the real load says why
    cparams = llc.llama_context_default_params()
    cparams.n_ctx = 256
    cparams.n_batch = cparams.n_ubatch = 512  # the engine's batch size, so the same kernels run
    # One thread unless asked: the instructions are the same, and on a busy machine threads that spin at
    # ggml's barriers for a descheduled sibling turned 30 ms of decoding into seconds.
    cparams.n_threads = cparams.n_threads_batch = threads or 1
    cparams.flash_attn_type = llc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llc.llama_init_from_model(m, cparams)
    if not ctx:
        return 3
    print(LOADED, flush=True)
    vocab = llc.llama_model_get_vocab(m)
    n_vocab = llc.llama_vocab_n_tokens(vocab)
    prompt = [(i * 7919 + 13) % n_vocab for i in range(32)]  # any ids: this checks instructions, not text
    tokens = (llc.llama_token * len(prompt))(*prompt)
    if llc.llama_decode(ctx, llc.llama_batch_get_one(tokens, len(prompt))) != 0:
        return 3
    one = (llc.llama_token * 1)(prompt[0])
    if llc.llama_decode(ctx, llc.llama_batch_get_one(one, 1)) != 0:
        return 3
    print(DECODED, flush=True)
    llc.llama_free(ctx)
    llc.llama_model_free(m)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`--verify [MODEL]`: check this build now (no remembered verdict); `--fix-command`: print the
    rebuild command; a bare MODEL: be the child."""
    parser = argparse.ArgumentParser(
        prog="python -m pureapi.engines.preflight",
        description="Check that the installed llama.cpp build runs on this CPU.",
    )
    parser.add_argument("model", nargs="?", help="a .gguf file (default with --verify: the embedded model)")
    parser.add_argument("--verify", action="store_true", help="run the check in a child process and report")
    parser.add_argument("--fix-command", action="store_true", help="print the command that rebuilds for this CPU")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    parser.add_argument("--threads", type=int, default=None, help="decoding threads (default 1)")
    parser.add_argument("--exit-with-parent", action="store_true", help="as the child: stop when stdin closes")
    ns = parser.parse_args(argv)
    if ns.fix_command:
        print(fix_command())
        return 0
    if ns.verify:
        from ..models.resolve import resolve_model

        try:
            model = Path(ns.model) if ns.model else resolve_model("smollm2").path
            with tempfile.TemporaryDirectory() as scratch:
                decoded = check_llamacpp(
                    model, flash_attn=ns.flash_attn == "on", threads=ns.threads, verdicts=[Path(scratch)]
                )
        except ModelLoadError as exc:
            print(f"pureapi: {exc}", file=sys.stderr)
            return 1
        if not decoded:
            print(f"pureapi: model file {model}: llama.cpp cannot load it or decode with it", file=sys.stderr)
            return 1
        print(f"llama.cpp ({_installed_version()}) loads and decodes {model.name} on this CPU")
        return 0
    if not ns.model:
        parser.error("a model file is needed")
    if ns.exit_with_parent:
        threading.Thread(target=_exit_at_eof, name="parent-watch", daemon=True).start()
    return _child(ns.model, ns.flash_attn == "on", ns.threads)


def _exit_at_eof() -> None:
    """End this process once stdin closes: the server that started the check is gone."""
    sys.stdin.read()
    os._exit(EXIT_ORPHANED)


if __name__ == "__main__":
    raise SystemExit(main())
