#!/bin/bash
# The ml-100k figures of one code tree on a fixed seed and a small budget, to compare two trees
# (a refactor must give the same numbers): benchmarks/quality/compare_figures.py BEFORE AFTER.
#   usage: benchmarks/quality/fixed_seed_figures.sh SRC_TREE OUT_DIR
#   env:   PY (default: this checkout's .venv/bin/python), DATA (default: movielens:../shared/data/ml-100k)
# SRC_TREE is a checkout (e.g. `git archive REV | tar -x -C DIR`); its own packages are imported,
# whichever CLI layout it has (training/cli.py before issue 16, recsys_cli/ after).
set -e
SRC=$(realpath "$1"); OUT=$(realpath -m "$2")
PY=${PY:-$(realpath -s .venv/bin/python)}  # -s: the venv's python, not the interpreter its symlink points to
D=${DATA:-movielens:$(realpath ../shared/data/ml-100k)}
mkdir -p "$OUT"; cd "$SRC"
if [ -d recsys_cli ]; then MAIN=recsys_cli.main; else MAIN=training.cli; fi
run() {
    "$PY" -c "import os, sys; sys.path.insert(0, os.getcwd()); import training
assert training.__file__.startswith(os.getcwd()), training.__file__
from $MAIN import main; sys.exit(main(sys.argv[1:]))" "$@"
}
export OMP_NUM_THREADS=1
run train retrieval --data $D --launchers 2 --holdout 6 --epochs 3 --seed 0 --threads 1 --quiet --out $OUT/upstream --json $OUT/upstream.json
run train retrieval --data $D --launchers 2 --init-from $OUT/upstream --epochs 2 --seed 0 --threads 1 --quiet --out $OUT/retrieval --json $OUT/retrieval.json
run train prerank --data $D --model inttower --objective next-item --retrieval $OUT/retrieval --upstream $OUT/upstream --out $OUT/prerank --epochs 2 --seed 0 --threads 1 --json $OUT/prerank.json
run train rerank --data $D --retrieval $OUT/retrieval --upstream $OUT/upstream --prerank $OUT/prerank --out $OUT/rerank --epochs 2 --seed 0 --threads 1 --json $OUT/rerank.json
run export --data $D --retrieval $OUT/retrieval --prerank $OUT/prerank --rerank $OUT/rerank --out $OUT/artifacts --version v1 --threads 1
run evaluate --artifacts $OUT/artifacts --data $D --json $OUT/evaluate.json
