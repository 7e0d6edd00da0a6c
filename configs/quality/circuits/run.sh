#!/usr/bin/env bash
# The circuits quality study (issue 11), from the repository root: bash configs/quality/circuits/run.sh
# Cache (once), one sweep training every dictionary, TopK -> JumpReLU conversion of the CLTs, held-out evaluation of
# everything, then a table (summary.py). About an hour on 2 CPU cores.
#
# Measured 2026-12-06 on 2 shared CPU cores (sweep 35 min, conversions 3 min each, evaluations 4-12 min each):
# held-out EV per output hook on 8192 tokens of the last 10% of documents, spliced CE loss recovered on 4096 of them
# (all output hooks at once; alone = each hook alone, from clean activations); crosscoder L0 counts each head's copy
# (33.1 distinct features per token); dead = no firing in the 8192 tokens.
#   dictionary               EV per output hook                  L0  CE rec. CE rec. alone                  dead
#   clt-batchtopk-jumprelu   0.467 0.526 0.568 0.605           68.0    0.868 -                             0.448
#   clt-batchtopk            0.467 0.525 0.567 0.605           66.6    0.868 -                             0.470
#   clt-topk-jumprelu        0.477 0.526 0.569 0.605           66.9    0.862 -                             0.419
#   clt-topk                 0.476 0.526 0.568 0.605           63.9    0.864 0.692 0.765 0.657 0.878       0.438
#   crosscoder               0.929 0.925 0.915                 96.0    0.987 0.988 0.987 0.987             0.236
#   sae-5                    0.928                             32.0    0.988 -                             0.095
#   tc-3                     0.499                             16.0    0.688 -                             0.099
#   tc-4                     0.490                             16.0    0.736 -                             0.181
#   tc-5                     0.508                             16.0    0.628 -                             0.221
#   tc-6                     0.541                             16.0    0.854 -                             0.207
set -euo pipefail
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
LM=.venv/bin/lm-saes Q=configs/quality/circuits R=.lm_saes/quality/circuits
[ -d $R/activations ] || $LM generate $Q/generate.yaml
$LM sweep $Q/sweep.yaml
for name in clt-topk clt-batchtopk; do
  [ -f $R/$name-jumprelu/config.json ] || $LM convert-topk-to-jumprelu $Q/convert.yaml --set sae.pretrained_name_or_path=$R/$name \
    --set sae_name=$name-jumprelu --set exp_result_path=$R/$name-jumprelu
done
# Each layer (head) alone only for the first CLT and the crosscoder: 2 more passes of the model per output hook.
for name in clt-topk tc-3 tc-4 tc-5 tc-6 crosscoder sae-5 clt-batchtopk clt-topk-jumprelu clt-batchtopk-jumprelu; do
  each=false; case $name in clt-topk|crosscoder) each=true;; esac
  [ -f $R/eval/$name.json ] || $LM evaluate $Q/evaluate.yaml --set sae.pretrained_name_or_path=$R/$name \
    --set sae_name=$name --set output_path=$R/eval/$name.json --set eval.splice_each_output=$each > /dev/null
done
.venv/bin/python $Q/summary.py $R/eval
