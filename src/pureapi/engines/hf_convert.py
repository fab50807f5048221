"""A GGUF file as transformers weights: dequantized once, cached as safetensors."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError

log = logging.getLogger(__name__)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF once and save it as safetensors, so later starts take a second, not a minute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s for transformers (once; cached in %s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model file {gguf}: transformers cannot load it ({str(exc).splitlines()[0]})") from None
    # The weights are plain float tensors now; drop the GGUF quantizer marker so they can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
