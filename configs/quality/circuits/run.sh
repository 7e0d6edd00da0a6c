#!/usr/bin/env bash
# The circuits quality study (issue 11), from the repository root: bash configs/quality/circuits/run.sh
# Cache (once), one sweep training every dictionary, TopK -> JumpReLU conversion of the CLTs, held-out evaluation of
# everything, then a table (summary.py). About an hour on 2 CPU cores.
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
