#!/bin/bash
# Every command's --json output and lens files from one checkout, to compare two versions for behaviour changes:
#   scripts/compare_outputs.sh CHECKOUT OUTDIR   (e.g. a worktree of the old commit, then this one)
# Needs a tiny model and corpus in /tmp/oneway-cmp/{model,corpus} (tests/conftest.py: make_model_dir, make_corpus).
# Used for the layout redesign (issue 12): every JSON document equal to 73c5d7d's except timings, lens weights
# byte-identical (bench/results/layout-before-73c5d7d.json, layout-after-c76aef7.json).
set -e
R=$1; O=$2; mkdir -p $O
M=/tmp/oneway-cmp/model; C=/tmp/oneway-cmp/corpus
run() { name=$1; shift; (cd $R && PYTHONPATH=$R HF_HUB_OFFLINE=1 /work/main/.venv/bin/python -m attention_lens "$@" --json > $O/$name.json 2>/dev/null) || echo "FAIL $name"; }
run fit fit --model $M --data $C --seq-len 16 --tokens 512 --eval-tokens 64 --out $O/fitlens --overwrite
run train train --model $M --data $C --seq-len 16 --tokens 256 --eval-tokens 64 --init $O/fitlens --out $O/trainlens --overwrite
run train_full train --model $M --data $C --seq-len 16 --tokens 128 --kind full --layers 1 --eval-tokens 64 --out $O/fulllens --overwrite
run eval eval --lens $O/trainlens --data $C --seq-len 16 --tokens 128 --constant-tokens 128 --bootstrap 20
run eval_dla eval --lens dla --model $M --data $C --seq-len 16 --tokens 128 --constant-tokens 128 --bootstrap 20
run spec specialize --lens $O/trainlens --data $C --seq-len 16 --tokens 128 --compare-layers
run decode decode --lens $O/fulllens --position all "The quick brown fox"
run decode_dla decode --lens dla --model $M --position all "The quick brown fox"
run search search --lens $O/trainlens --concept "fox, dog" --data $C --seq-len 16 --tokens 128 --top 3 --verify --repeats 3
