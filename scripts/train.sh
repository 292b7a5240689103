#!/usr/bin/env bash
# The main job: set up a fresh machine (scripts/setup.sh) and train the tiny GPT on the embedded corpus (about five
# minutes on two CPU cores); extra arguments go to `lmrt train` (e.g. --model lstm, --data my_texts/, --resume).
set -euo pipefail
source "$(dirname "$0")/setup.sh"

exec .venv/bin/lmrt train --preset tiny --out runs/tiny "$@"
