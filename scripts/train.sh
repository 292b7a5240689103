#!/usr/bin/env bash
# The main job: set up a fresh machine (scripts/setup.sh) and train the tiny GPT on the embedded corpus (about five
# minutes on two CPU cores); extra arguments go to `lmrt train` (e.g. --model lstm, --data my_texts/, --resume). With
# --config, the file's preset and out_dir hold: the tiny preset and runs/tiny are only the defaults of a run without.
set -euo pipefail
source "$(dirname "$0")/setup.sh"

defaults=(--preset tiny --out runs/tiny)
for arg in "$@"; do
  case "$arg" in
    --config | --config=*) defaults=() ;;
  esac
done
exec .venv/bin/lmrt train "${defaults[@]}" "$@"
