#!/usr/bin/env bash
# Seed launcher: ./start_api.sh [--qwen | --llama | --model NAME] [--port N] [other pure_model_api.py flags]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --qwen) args+=(--model qwen) ;;
    --llama) args+=(--model llama) ;;
    -h|--help)
      echo "usage: $0 [--qwen | --llama | --model NAME] [--port N] [pure_model_api.py flags]"
      echo "  --qwen   serve Qwen2.5-7B-Instruct (its Q4_K_M GGUF on a CPU, bf16 on a GPU that holds it)"
      echo "  --llama  serve Llama-3.1-8B-Instruct (bartowski Q4_K_M GGUF on a CPU, bf16 on a GPU)"
      echo "  with neither, the embedded SmolLM2-135M-Instruct"
      exec "$python" "$here/pure_model_api.py" --help ;;
    *) args+=("$1") ;;
  esac
  shift
done
exec "$python" "$here/pure_model_api.py" "${args[@]+"${args[@]}"}"
