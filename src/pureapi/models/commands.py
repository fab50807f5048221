"""`pureapi pull MODEL` downloads ahead of time; `pureapi models` lists the catalogue for this machine."""

from __future__ import annotations

import argparse
import sys

from ..errors import ModelLoadError
from . import fit, hardware
from .catalogue import CATALOGUE, DEFAULT_QUANT
from .resolve import Build, build_need, choose_build, fetch_build, pool_windows

ENGINES = ["auto", "transformers", "llamacpp"]


def _build_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", default=None, help=f"GGUF quantization (default: {DEFAULT_QUANT})")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="which build: auto picks for this machine")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N: the machine to pick for")


def pull(argv: list[str]) -> int:
    """Download a model's build for this machine (or the one --engine names) into the Hugging Face cache."""
    parser = argparse.ArgumentParser(prog="pureapi pull", description=pull.__doc__)
    parser.add_argument("model", help="an alias (qwen, llama-70b, ...), a Hugging Face id or a -GGUF repo")
    _build_flags(parser)
    ns = parser.parse_args(argv)
    try:
        hw = hardware.detect(want_gpus=ns.device != "cpu")
        build = choose_build(ns.model, hw, engine=ns.engine, device=ns.device, quant=ns.quant)
        print(f"pulling {build.label()} for the {build.engine} engine", file=sys.stderr)
        model = fetch_build(build)
    except ModelLoadError as exc:
        print(f"pureapi: {exc}", file=sys.stderr)
        return 1
    print(model.path)
    return 0


def _cached(build: Build) -> str:
    from . import download

    if build.local is not None:
        return "embedded" if build.repo is None and build.entry is not None else "local"
    assert build.repo is not None
    return "cached" if download.is_cached(build.repo, list(build.patterns)) else "-"


def rows(hw: hardware.Hardware, *, engine: str, device: str, quant: str | None, slots: int) -> list[list[str]]:
    """One row per catalogue model: its Hugging Face id, its aliases, the build it resolves to here, its memory
    need, whether that fits, and its cache state."""
    out = []
    for entry in CATALOGUE:
        alias = entry.aliases[0]
        try:
            build = choose_build(alias, hw, engine=engine, device=device, quant=quant)
        except ModelLoadError as exc:
            out.append([entry.name, ", ".join(entry.aliases), str(exc), "", "", ""])
            continue
        need = build_need(build, None, pool_windows(slots))  # llama.cpp's slots share a pool of windows
        free = hw.ram_free if build.gguf or build.device == "cpu" else sum(g.free for g in hw.gpus)
        fits = "" if need is None else ("yes" if need.total <= free else "no")
        shown = build.label() if build.repo else f"{build.local.name if build.local else build.name} (embedded)"
        out.append(
            [
                entry.name,
                ", ".join(entry.aliases),
                f"{build.engine}: {shown}",
                fit.human(need.total) if need else "?",
                fits,
                _cached(build),
            ]
        )
    return out


def models(argv: list[str]) -> int:
    """List the catalogue: each model's Hugging Face id and aliases (either names it), what it resolves to on this
    machine, its memory need, whether it is cached."""
    parser = argparse.ArgumentParser(prog="pureapi models", description=models.__doc__)
    _build_flags(parser)
    parser.add_argument("--parallel", type=int, default=4, help="slots the memory need counts (default: 4)")
    ns = parser.parse_args(argv)
    hw = hardware.detect(want_gpus=ns.device != "cpu")
    gpus = ", ".join(f"cuda:{g.index} {g.name} {fit.human(g.free)} free" for g in hw.gpus) or "no GPU"
    print(f"this machine: {fit.human(hw.ram_free)} of {fit.human(hw.ram_total)} RAM free; {gpus}")
    table = [["MODEL", "ALIASES", "BUILD HERE", "NEEDS", "FITS", "LOCAL"]]
    table += rows(hw, engine=ns.engine, device=ns.device, quant=ns.quant, slots=ns.parallel)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())
    return 0
