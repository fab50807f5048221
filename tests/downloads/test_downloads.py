"""Downloads through the stand-in hub: only one quantization, split parts, progress, resume, gated, offline."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from ..hub import Repo, stand_in_hub
from .conftest import ROOT, Cli, write_gguf, write_hf_folder

QWEN_GGUF = "Qwen/Qwen2.5-7B-Instruct-GGUF"
PART1 = "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf"
PART2 = "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def qwen_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """The 7B GGUF repo as Qwen publishes it: Q4_K_M split in two parts, Q8_0 whole, a README."""
    folder = tmp_path_factory.mktemp("qwen-gguf")
    parts = write_gguf(folder / "qwen2.5-7b-instruct-q4_k_m.gguf", split_parts=2, tensor_bytes=256 << 10)
    assert [p.name for p in parts] == [PART1, PART2]
    q8 = write_gguf(folder / "qwen2.5-7b-instruct-q8_0.gguf")[0]
    readme = folder / "README.md"
    readme.write_text("# Qwen2.5-7B-Instruct-GGUF\n")
    return Repo(files={PART1: parts[0], PART2: parts[1], q8.name: q8, "README.md": readme})


def test_pull_fetches_one_quantization_split_parts_included_with_progress(cli: Cli, qwen_repo: Repo) -> None:
    with stand_in_hub({QWEN_GGUF: qwen_repo}) as hub:
        cli.url = hub.url
        run = cli.run("pull", "qwen")
    assert run.rc == 0, run.err
    first = Path(run.out.strip())
    assert first.name == PART1  # llama.cpp loads a split set from its first part
    assert _sha(first) == _sha(qwen_repo.files[PART1])
    assert _sha(first.with_name(PART2)) == _sha(qwen_repo.files[PART2])
    assert hub.downloads("qwen2.5-7b-instruct-q8_0.gguf") == []  # not the whole repo
    assert hub.downloads("README.md") == []
    assert "100%" in run.err  # huggingface_hub's progress bars, on stderr


def test_a_dropped_connection_resumes_where_it_stopped(cli: Cli, tmp_path: Path) -> None:
    # Larger than huggingface_hub's 10 MiB read chunk, dropped after 12 MiB: the retry must ask for the rest.
    whole = write_gguf(tmp_path / "qwen2.5-7b-instruct-q4_k_m.gguf", tensor_bytes=6 << 20)[0]
    name = whole.name
    with stand_in_hub({QWEN_GGUF: Repo(files={name: whole})}) as hub:
        cli.url = hub.url
        hub.drop_once[name] = 12 << 20
        run = cli.run("pull", "qwen")
    assert run.rc == 0, run.err
    assert _sha(Path(run.out.strip())) == _sha(whole)
    ranges = hub.downloads(name)
    assert len(ranges) == 2 and ranges[0] is None, ranges
    assert ranges[1] is not None and int(ranges[1].removeprefix("bytes=").split("-")[0]) >= 10 << 20, ranges
    assert "Trying to resume download" in run.err


def test_a_gated_repo_without_a_token_says_what_to_do(cli: Cli, tmp_path: Path) -> None:
    files = write_hf_folder(tmp_path / "llama")
    with stand_in_hub({"meta-llama/Llama-3.1-8B-Instruct": Repo(files=files, gated=True)}) as hub:
        cli.url = hub.url
        refused = cli.run("pull", "llama", "--engine", "transformers")
        granted = cli.run("pull", "llama", "--engine", "transformers", HF_TOKEN="hf_stand_in_token")
    assert refused.rc == 1
    line = refused.err.strip().splitlines()[-1]
    assert "gated" in line and "accept its license" in line and "HF_TOKEN" in line, refused.err
    assert "Traceback" not in refused.err
    assert granted.rc == 0, granted.err
    folder = Path(granted.out.strip())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not (folder / "pytorch_model.bin").exists()  # one weights format, not every copy


def test_offline_without_a_cached_copy_is_one_line(cli: Cli, qwen_repo: Repo) -> None:
    with stand_in_hub({QWEN_GGUF: qwen_repo}) as hub:
        cli.url = hub.url
        run = cli.run("pull", "qwen", HF_HUB_OFFLINE="1")
    assert run.rc == 1
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in run.err
    assert "Traceback" not in run.err
    assert hub.log == []  # offline means not a single request


def test_offline_with_a_cached_copy_uses_it(cli: Cli, qwen_repo: Repo) -> None:
    with stand_in_hub({QWEN_GGUF: qwen_repo}) as hub:
        cli.url = hub.url
        online = cli.run("pull", "qwen")
        requests_before = len(hub.log)
        offline = cli.run("pull", "qwen", HF_HUB_OFFLINE="1")
        listed = cli.run("models", HF_HUB_OFFLINE="1")
    assert online.rc == 0, online.err
    assert offline.rc == 0, offline.err
    assert offline.out == online.out
    assert len(hub.log) == requests_before
    qwen_row = next(line for line in listed.out.splitlines() if line.startswith("Qwen/Qwen2.5-7B-Instruct "))
    assert QWEN_GGUF in qwen_row and "cached" in qwen_row


def test_the_hub_unreachable_is_one_line(cli: Cli) -> None:
    cli.url = "http://127.0.0.1:9"  # the discard port: nothing listens
    run = cli.run("pull", "qwen", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    assert run.rc == 1
    assert "Traceback" not in run.err
    assert "qwen" in run.err.lower() and len(run.err.strip().splitlines()) <= 2, run.err


def test_a_model_too_big_for_the_memory_is_refused_before_any_download(cli: Cli) -> None:
    with stand_in_hub({}) as hub:
        cli.url = hub.url
        proc = subprocess.run(
            [sys.executable, str(ROOT / "pure_model_api.py"), "--model", "qwen", "--max-memory", "6GB"],
            capture_output=True,
            text=True,
            env=cli.env(),
            timeout=120,
        )
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("pureapi: model Qwen/Qwen2.5-7B-Instruct-GGUF (Q4_K_M) does not fit"), proc.stderr
    assert "--quant Q2_K" in line and "--parallel 1" in line
    assert hub.log == []  # refused before a single request, let alone a byte of weights


def test_the_embedded_model_is_refused_before_its_weights_are_read(cli: Cli, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pure_model_api.py"), "--max-memory", "50MB", "--db", str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        env=cli.env(),
        timeout=120,
    )
    assert proc.returncode == 1
    assert "SmolLM2-135M-Instruct.Q4_1.gguf does not fit" in proc.stderr and "50.0 MB of RAM" in proc.stderr
    assert "Traceback" not in proc.stderr and "listening" not in proc.stderr


def test_a_gguf_repo_outside_the_catalogue_takes_one_quant_and_is_sized_once_here(cli: Cli, tmp_path: Path) -> None:
    files = {
        p.name: p
        for p in (write_gguf(tmp_path / "tiny-Q4_K_M.gguf")[0], write_gguf(tmp_path / "tiny-Q8_0.gguf", layers=3)[0])
    }
    with stand_in_hub({"someone/Tiny-GGUF": Repo(files=files)}) as hub:
        cli.url = hub.url
        q8 = cli.run("pull", "someone/Tiny-GGUF", "--quant", "Q8_0")
        refused = subprocess.run(
            [sys.executable, str(ROOT / "pure_model_api.py"), "--model", "someone/Tiny-GGUF", "--max-memory", "2MB"],
            capture_output=True,
            text=True,
            env=cli.env(),
            timeout=120,
        )
    assert q8.rc == 0, q8.err
    assert Path(q8.out.strip()).name == "tiny-Q8_0.gguf"
    assert hub.downloads("tiny-Q8_0.gguf") and len(hub.downloads("tiny-Q4_K_M.gguf")) == 1  # one each, no more
    assert refused.returncode == 1
    assert "someone/Tiny-GGUF (Q4_K_M) does not fit" in refused.stderr
    assert "2.0 MB of RAM (--max-memory)" in refused.stderr


def test_gpus_are_read_from_nvidia_smi_and_the_choice_follows_them(cli: Cli, tmp_path: Path) -> None:
    """A stand-in nvidia-smi: two 80 GB GPUs, the second nearly full and hidden by CUDA_VISIBLE_DEVICES."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\necho "0, NVIDIA H100 80GB HBM3, 81559, 1024"\necho "1, NVIDIA H100 80GB HBM3, 81559, 80000"\n'
    )
    smi.chmod(0o755)
    path = f"{bin_dir}:{cli.env()['PATH']}"
    listed = cli.run("models", PATH=path, CUDA_VISIBLE_DEVICES="1")
    pinned = cli.run("models", "--device", "cuda:0", PATH=path, CUDA_VISIBLE_DEVICES="0,1")
    code = "import sys\nfrom pureapi.models import hardware\nhardware.detect()\nprint('torch' in sys.modules)"
    probe = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli.env(PATH=path), check=True
    )
    assert listed.rc == 0, listed.err
    assert "cuda:0 NVIDIA H100 80GB HBM3 83.9 GB free" in listed.out  # GPU 1, renumbered as CUDA sees it
    qwen14 = next(line for line in listed.out.splitlines() if line.startswith("Qwen/Qwen2.5-14B-Instruct "))
    assert "transformers: Qwen/Qwen2.5-14B-Instruct " in qwen14 and "yes" in qwen14
    llama70 = next(line for line in listed.out.splitlines() if line.startswith("meta-llama/Llama-3.1-70B-Instruct "))
    assert "llamacpp: bartowski/Meta-Llama-3.1-70B-Instruct-GGUF" in llama70  # 141 GB of bf16: not on one GPU
    qwen_pinned = next(line for line in pinned.out.splitlines() if line.startswith("Qwen/Qwen2.5-7B-Instruct "))
    assert "llamacpp: Qwen/Qwen2.5-7B-Instruct-GGUF" in qwen_pinned  # GPU 0 has 1 GB free
    assert probe.stdout.strip() == "False"  # nvidia-smi answered: torch never imported
