"""The catalogue, the build choice per machine, the memory estimate and the fit check (no network)."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pureapi.errors import ModelLoadError
from pureapi.models import commands, fit, gguf, hardware
from pureapi.models.catalogue import CATALOGUE, lookup
from pureapi.models.hardware import Gpu, Hardware
from pureapi.models.resolve import build_need, check_fit, choose_build

GB = 10**9
CPU_24GB = Hardware(ram_total=24 * GB, ram_free=20 * GB)
GPU_80GB = Hardware(ram_total=64 * GB, ram_free=60 * GB, gpus=(Gpu(0, "H100", 80 * GB, 79 * GB),))
TWO_GPUS = Hardware(
    ram_total=64 * GB, ram_free=60 * GB, gpus=(Gpu(0, "A", 24 * GB, 2 * GB), Gpu(1, "B", 24 * GB, 23 * GB))
)


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("qwen", "Qwen/Qwen2.5-7B-Instruct"),
        ("qwen-14b", "Qwen/Qwen2.5-14B-Instruct"),
        ("qwen-32b", "Qwen/Qwen2.5-32B-Instruct"),
        ("llama", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llama-70b", "meta-llama/Llama-3.1-70B-Instruct"),
        ("Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-14B-Instruct"),
        ("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "meta-llama/Llama-3.1-8B-Instruct"),
    ],
)
def test_aliases_and_repos_find_their_model(alias: str, name: str) -> None:
    entry = lookup(alias)
    assert entry is not None and entry.name == name


def test_quant_patterns_take_split_parts_and_nothing_else() -> None:
    qwen14 = lookup("qwen-14b")
    llama70 = lookup("llama-70b")
    assert qwen14 is not None and llama70 is not None
    assert qwen14.gguf_matches("qwen2.5-14b-instruct-q4_k_m-00001-of-00003.gguf", "Q4_K_M")
    assert qwen14.gguf_matches("qwen2.5-14b-instruct-q4_k_m.gguf", "Q4_K_M")
    assert not qwen14.gguf_matches("qwen2.5-14b-instruct-q4_0.gguf", "Q4_K_M")
    assert not qwen14.gguf_matches("qwen2.5-14b-instruct-q5_k_m-00001-of-00003.gguf", "Q4_K_M")
    assert llama70.gguf_matches("Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf", "Q4_K_M")
    assert llama70.gguf_matches(
        "Meta-Llama-3.1-70B-Instruct-Q8_0/Meta-Llama-3.1-70B-Instruct-Q8_0-00001-of-00002.gguf", "Q8_0"
    )


def test_sizes_match_the_published_files() -> None:
    """Estimates within 10% of the sizes the hub lists for the Q4_K_M files."""
    published = {"qwen": 4.68 * GB, "llama": 4.92 * GB, "llama-70b": 42.5 * GB}
    for alias, size in published.items():
        entry = lookup(alias)
        assert entry is not None
        assert abs(entry.gguf_bytes("Q4_K_M") - size) / size < 0.1, alias


def test_without_a_gpu_every_model_resolves_to_its_gguf_build() -> None:
    build = choose_build("qwen", CPU_24GB)
    assert (build.engine, build.device, build.repo, build.quant) == (
        "llamacpp",
        "cpu",
        "Qwen/Qwen2.5-7B-Instruct-GGUF",
        "Q4_K_M",
    )
    assert choose_build("llama", CPU_24GB).repo == "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"
    assert choose_build("qwen", CPU_24GB, quant="Q8_0").patterns == ("qwen2.5-7b-instruct-q8_0*.gguf",)


def test_a_gpu_that_holds_the_bf16_weights_gets_the_transformers_build() -> None:
    build = choose_build("qwen-14b", GPU_80GB)
    assert (build.engine, build.device, build.repo) == ("transformers", "cuda", "Qwen/Qwen2.5-14B-Instruct")
    too_big = choose_build("llama-70b", GPU_80GB)  # 141 GB of bf16 weights
    assert (too_big.engine, too_big.repo) == ("llamacpp", "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF")


def test_device_pins_one_gpu_and_auto_spreads_over_all() -> None:
    # 15 GB of bf16 for the 7B: GPU 1 alone has 23 GB free, GPU 0 only 2 GB.
    assert choose_build("qwen", TWO_GPUS, device="cuda:1").engine == "transformers"
    assert choose_build("qwen", TWO_GPUS, device="cuda:0").engine == "llamacpp"
    # 29 GB for the 14B: neither GPU alone, both together (25 GB) not either.
    assert choose_build("qwen-14b", TWO_GPUS).engine == "llamacpp"


def test_the_embedded_model_by_its_hub_id_is_the_packaged_file() -> None:
    build = choose_build("HuggingFaceTB/SmolLM2-135M-Instruct", CPU_24GB)
    assert build.engine == "llamacpp" and build.local is not None and build.local.name.startswith("SmolLM2")
    hf = choose_build("HuggingFaceTB/SmolLM2-135M-Instruct", CPU_24GB, engine="transformers")
    assert hf.repo == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_an_unknown_quant_names_the_ones_there_are() -> None:
    with pytest.raises(ModelLoadError, match=r"no Q3_K_S build; --quant takes one of .*Q4_K_M"):
        choose_build("qwen", CPU_24GB, quant="Q3_K_S")


def test_a_model_too_big_is_refused_in_one_line_with_what_would_fit() -> None:
    build = choose_build("qwen", CPU_24GB)
    with pytest.raises(ModelLoadError) as info:
        check_fit(build, CPU_24GB, ctx=None, slots=4, max_memory=6 * GB)
    line = str(info.value)
    assert "\n" not in line
    assert "model Qwen/Qwen2.5-7B-Instruct-GGUF (Q4_K_M) does not fit" in line
    assert "6.0 GB of RAM (--max-memory) is free" in line
    assert "--quant Q2_K" in line and "--parallel 1" in line
    check_fit(build, CPU_24GB, ctx=None, slots=4)  # 7 GB on a 20 GB-free machine: fine


def test_the_70b_on_a_24gb_machine_points_at_smaller_models() -> None:
    build = choose_build("llama-70b", CPU_24GB)
    with pytest.raises(ModelLoadError, match=r"--model qwen-14b|--model qwen-32b|--model llama"):
        check_fit(build, CPU_24GB, ctx=None, slots=4)


def test_kv_cache_grows_with_slots_and_context() -> None:
    build = choose_build("qwen", CPU_24GB)
    one = build_need(build, 4096, 1)
    four = build_need(build, 4096, 4)
    assert one is not None and four is not None
    assert four.kv == 4 * one.kv == 4 * 4096 * 2 * 28 * 4 * 128 * 2


def test_the_catalogue_shape_of_smollm2_matches_its_gguf(smollm2_gguf: Path) -> None:
    shape = gguf.shape(smollm2_gguf)
    entry = next(m for m in CATALOGUE if "smollm2" in m.aliases)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (entry.layers, entry.kv_heads, entry.head_dim)
    assert shape.size == smollm2_gguf.stat().st_size


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def test_the_header_reader_steps_over_string_arrays_to_the_keys_after_them(tmp_path: Path) -> None:
    vocabulary = ["<|im_start|>", "a", "", "héllo"]
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 4)
    header += _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(vocabulary))
    header += b"".join(_gguf_string(t) for t in vocabulary)
    header += _gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<2f", 0.5, 1.0)
    header += _gguf_string("llama.block_count") + struct.pack("<II", 4, 30)
    header += _gguf_string("general.name") + struct.pack("<I", 8) + _gguf_string("tiny")
    path = tmp_path / "tiny.gguf"
    path.write_bytes(header)
    assert gguf.metadata(path) == {
        "tokenizer.ggml.tokens": None,
        "tokenizer.ggml.scores": None,
        "llama.block_count": 30,
        "general.name": "tiny",
    }
    assert gguf.shape(path).layers == 30
    path.write_bytes(header.replace(struct.pack("<II", 4, 30), struct.pack("<II", 4, 24)) + b"\0")
    assert gguf.shape(path).layers == 24  # a changed file is read again


def test_a_local_gguf_is_sized_from_its_header(smollm2_gguf: Path) -> None:
    build = choose_build(str(smollm2_gguf), CPU_24GB)
    need = build_need(build, 2048, 2)
    assert need is not None and need.weights == smollm2_gguf.stat().st_size
    with pytest.raises(ModelLoadError, match="does not fit"):
        check_fit(build, CPU_24GB, ctx=2048, slots=2, max_memory=50 * 10**6)


@pytest.mark.parametrize(("text", "value"), [("8GB", 8 * GB), ("7.5GiB", int(7.5 * (1 << 30))), ("512MiB", 512 << 20)])
def test_sizes_parse(text: str, value: int) -> None:
    assert fit.parse_size(text) == value


def test_a_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="not a size"):
        fit.parse_size("lots")


def test_deciding_on_a_machine_without_nvidia_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pureapi.settings import Settings\n"
        "from pureapi.engines.registry import choose_engine, resolve\n"
        "s = Settings(model='smollm2')\n"
        "choose_engine(s, resolve(s))\n"
        "print('torch' in sys.modules)\n"
    )
    driver = Path("/proc/driver/nvidia/version")
    if driver.exists():
        pytest.skip("this machine has an NVIDIA driver")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_fit_check_off_lets_a_model_through_and_on_refuses_it_before_loading() -> None:
    from pureapi.engines.registry import resolve
    from pureapi.settings import Settings

    tight = {"model": "smollm2", "max_memory": "50MB", "device": "cpu"}
    with pytest.raises(ModelLoadError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf does not fit.*50\.0 MB of RAM"):
        resolve(Settings(**tight))  # type: ignore[arg-type]
    assert resolve(Settings(**tight, fit_check="off")).is_gguf  # type: ignore[arg-type]


def test_models_lists_each_id_beside_its_aliases(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(hardware, "detect", lambda want_gpus=True: CPU_24GB)
    assert commands.models([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["MODEL", "ALIASES", "BUILD"]
    for entry in CATALOGUE:
        row = next(line for line in lines if line.startswith(entry.name + " "))
        assert re.split(r"\s{2,}", row)[1] == ", ".join(entry.aliases), row
        assert lookup(entry.name) is entry  # the id shown is one `pureapi pull` and --model take
