"""The start-up check of the llama.cpp build: a crash on this CPU becomes one line and exit 1.

A llama.cpp that really crashes is made by preloading a tiny library whose `ggml_*` function (called
by libllama across libraries, so the preload takes its place) raises SIGILL or SIGSEGV, as an AMX
instruction does on a VM that advertises AMX but traps on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pureapi.engines import preflight

from ..conftest import ROOT, free_port

# Called once per llama_decode (from libllama into libggml-base): dying here is dying at decode.
DECODE_CRASH = """
#include <signal.h>
int ggml_backend_sched_graph_compute_async(void *sched, void *graph) { raise(SIGILL); return 0; }
"""
# Called by libllama's model loader to read the GGUF header: dying here is dying while loading.
LOAD_CRASH = """
#include <signal.h>
void *gguf_init_from_file(const char *fname, void *params) { raise(SIGSEGV); return 0; }
"""

AVX512_AMX_VM = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"}
AVX512_AMX_VM |= {"amx_tile", "amx_int8"}
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}


def test_cmake_args_follow_the_cpu_and_never_use_amx() -> None:
    avx512 = preflight.cmake_args(AVX512_AMX_VM)
    assert avx512.startswith("-DGGML_NATIVE=OFF")
    assert "-DGGML_AVX512=ON" in avx512 and "-DGGML_AVX512_VNNI=ON" in avx512 and "-DGGML_AVX512_BF16=ON" in avx512
    assert "AMX" not in avx512  # ggml's AMX options default to OFF
    avx2 = preflight.cmake_args(AVX2_ONLY)
    assert "-DGGML_AVX2=ON" in avx2 and "-DGGML_BMI2=ON" in avx2
    assert "-DGGML_AVX512=OFF" in avx2 and "-DGGML_AVX512_VNNI=OFF" in avx2
    # GGML_NATIVE=OFF turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C on by default: a CPU without them says OFF.
    old = preflight.cmake_args({"sse4_2", "avx"})
    assert "-DGGML_AVX=ON" in old and "-DGGML_AVX2=OFF" in old and "-DGGML_FMA=OFF" in old


def test_fix_command_bypasses_the_wheel_cache() -> None:
    command = preflight.fix_command(AVX2_ONLY)
    assert command.startswith('CMAKE_ARGS="-DGGML_NATIVE=OFF ')
    assert "--no-cache-dir --force-reinstall --no-deps llama-cpp-python==" in command


def counting_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A model file, and a file that a stand-in child (reporting both stages) grows by one x a run."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    runs = tmp_path / "runs"
    report = f"open({str(runs)!r}, 'a').write('x'); print({preflight.LOADED!r}); print({preflight.DECODED!r})"
    monkeypatch.setattr(preflight, "child_command", lambda *args: [sys.executable, "-c", report])
    return model, runs


def test_a_verdict_is_remembered_per_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, runs = counting_child(tmp_path, monkeypatch)
    verdicts = tmp_path / "verdicts"
    assert preflight.check_llamacpp(model, flash_attn=True, threads=None, verdicts=[verdicts])
    assert preflight.check_llamacpp(model, flash_attn=True, threads=None, verdicts=[verdicts])
    assert runs.read_text() == "x"  # the second start trusts the first verdict
    monkeypatch.setattr(preflight, "library_identity", lambda: [("libggml-cpu.so", 1, 2)])  # a rebuild
    assert preflight.check_llamacpp(model, flash_attn=True, threads=None, verdicts=[verdicts])
    assert runs.read_text() == "xx"


def test_a_verdict_beside_the_build_serves_every_home_of_that_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, runs = counting_child(tmp_path, monkeypatch)
    shared = tmp_path / "prefix"

    def check(home: str) -> bool:
        return preflight.check_llamacpp(model, flash_attn=True, threads=None, verdicts=[shared, tmp_path / home])

    assert check("home1") and check("home2")
    assert runs.read_text() == "x" and not (tmp_path / "home1").exists()  # a fresh home found the shared verdict
    monkeypatch.setattr(preflight, "cpu_flags", lambda: {"avx2", "amx_tile"})  # the install copied to another CPU
    assert check("home2")
    assert runs.read_text() == "xx"
    unwritable = tmp_path / "file"
    unwritable.write_text("")  # a folder that cannot be made: the verdict goes to the next one
    assert preflight.check_llamacpp(model, flash_attn=False, threads=None, verdicts=[unwritable, tmp_path / "home3"])
    assert len(list((tmp_path / "home3").iterdir())) == 1


def test_the_server_loads_while_the_child_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`loaded` returns at the child's first stage, `decoded` only once the child ended (and stamps the verdict)."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    gate = tmp_path / "gate"
    child = (
        f"import os, time; print({preflight.LOADED!r}, flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        f"print({preflight.DECODED!r})"
    )
    monkeypatch.setattr(preflight, "child_command", lambda *args: [sys.executable, "-c", child])
    monkeypatch.setattr(preflight, "CHILD_TIMEOUT_S", 20)  # a wait for the child's end fails, not hangs
    verdicts = tmp_path / "verdicts"
    check = preflight.start_check(model, flash_attn=True, threads=None, verdicts=[verdicts])
    check.loaded()  # returns although the child waits for the gate: the server may load meanwhile
    assert check.stages == [preflight.LOADED] and not verdicts.exists()
    gate.write_text("")
    assert check.decoded()
    assert check.stages == [preflight.LOADED, preflight.DECODED] and len(list(verdicts.iterdir())) == 1


def test_the_child_stops_when_the_server_is_gone(tmp_path: Path) -> None:
    """A server that exits while its check runs (a port in use) closes the child's stdin: the child stops
    there (exit 5), instead of loading and decoding for nobody (it would end 3 on this file)."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    check = preflight.start_check(model, flash_attn=True, threads=None, verdicts=[tmp_path / "verdicts"])
    assert check.proc is not None and check.proc.stdin is not None
    check.proc.stdin.close()  # what the kernel does to the pipe when the server's process ends
    assert check.proc.wait(timeout=60) == preflight.EXIT_ORPHANED
    assert not (tmp_path / "verdicts").exists()


def _shim(tmp_path: Path, source: str, name: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the crashing library")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    lib = tmp_path / f"lib{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def _serve(tmp_path: Path, preload: Path, model: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LD_PRELOAD": str(preload),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),  # no verdict from an earlier run
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, str(ROOT / "pure_model_api.py"), "--model", str(model)]
    cmd += ["--port", str(free_port()), "--db", str(tmp_path / "s.db")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("pureapi: ")]


@pytest.mark.real
def test_a_build_that_dies_at_decode_is_one_line_and_exit_1(tmp_path: Path, smollm2_gguf: Path) -> None:
    proc = _serve(tmp_path, _shim(tmp_path, DECODE_CRASH, "decode_crash"), smollm2_gguf)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = _error_lines(proc)
    assert "crashed (SIGILL) at its first decode" in line
    assert "CPU instructions this machine cannot run" in line
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF' in line
    assert "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==" in line


@pytest.mark.real
def test_a_build_that_dies_loading_names_the_model_file(tmp_path: Path, smollm2_gguf: Path) -> None:
    proc = _serve(tmp_path, _shim(tmp_path, LOAD_CRASH, "load_crash"), smollm2_gguf)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _error_lines(proc) == [f"pureapi: model file {smollm2_gguf}: llama.cpp crashed (SIGSEGV) while loading it"]


@pytest.mark.real
def test_verify_passes_on_this_machine_and_remembers_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "pureapi.engines.preflight", "--verify"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loads and decodes SmolLM2-135M-Instruct.Q4_1.gguf on this CPU" in proc.stdout
    assert not (tmp_path / "cache").exists()


@pytest.mark.real
def test_a_refusal_is_left_to_the_real_load(tmp_path: Path, smollm2_gguf: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 4 << 20])  # a valid header, most tensors missing
    verdicts = tmp_path / "verdicts"
    assert preflight.check_llamacpp(truncated, flash_attn=True, threads=None, verdicts=[verdicts]) is False
    assert not verdicts.exists()
