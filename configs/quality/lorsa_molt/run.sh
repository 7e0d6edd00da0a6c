#!/usr/bin/env bash
# The Lorsa/MOLT quality study (issue 12), from the repository root: bash configs/quality/lorsa_molt/run.sh
# Cache layer 3's four hooks once (2-D: whole contexts; first 90% of the documents) and a held-out cache (last 10%),
# one sweep training the token-wise dictionaries (TopK SAE on attn_out, TopK transcoder and MOLT on the MLP), the
# Lorsa on whole contexts, held-out evaluation of all four, then a table (summary.py).
#
# Measured 2026-12-06 on 2 shared CPU cores (load 4-9 from other jobs; wall / user CPU): cache 8.5 / 3.4 min (262,144
# positions), held-out cache 0.8 min, sweep 6.8 min, Lorsa 7.2 min, evaluations 13-19 s each; 24 min wall, 16 min CPU
# in all. Trained on 2 epochs of the cache (SAE, transcoder, MOLT 500,641 tokens; Lorsa 501,570), evaluated on the
# held-out cache (15,735 tokens of documents never trained on). EV train = the last logged training window; params =
# every saved tensor (Lorsa: W_Q, W_K, b_Q, b_K, W_V, b_V, W_O, b_D); dead = no firing in the held-out tokens.
#   dictionary kind   output hook            features     params     L0     EV EV train   dead
#   lorsa      lorsa  blocks.3.hook_attn_out     4608  6,643,008   32.0  0.803    0.833  0.472
#   sae-attn   sae    blocks.3.hook_attn_out     4608  5,313,600   32.0  0.834    0.868  0.570
#   molt-mlp   molt   blocks.3.hook_mlp_out      1740  5,280,780   32.0  0.480    0.598  0.725
#              active transforms per token by rank: rank 1: 0.9, rank 2: 2.4, rank 4: 12.4, rank 8: 16.3; summed
#              rank 185.7
#   tc-mlp     tc     blocks.3.hook_mlp_out      4608  5,313,600   32.0  0.518    0.655  0.158
# 2026-12-06 (second pass): the Lorsa row is lorsa.yaml with the QK circuit frozen at the host's heads (qk_lr_factor 0;
# lr 0.002, 512 steps, the other settings as before; 11.8 min wall beside another run at load 4-7). Learning the QK
# circuit at lr 0.002, as the first pass did, gave 0.708 (train 0.762, dead 0.503). The Lorsa stays 0.031 EV below the
# SAE of its width and L0 (the issue's goal, EV >= the SAE's, is still not met here); the transcoder beats the MOLT of
# 0.6% fewer parameters by 0.04. After one epoch (half the tokens, same settings) held-out EV was Lorsa 0.772 (QK
# learned: 0.677) / SAE 0.800 and MOLT 0.441 / transcoder 0.445. MOLT's initial-norm grid search picks its lower edge
# (0.01) because its objective has no interior optimum: a random MOLT's reconstruction only adds error, so the initial
# l_rec is flat below 0.01 (622.66 at 1e-4 to 1e-2) and rises above (622.71 at 0.1, 889 at 1, 22,028 at 3); a wider
# range ends at its lower edge too.
# 2026-12-07: where the Lorsa's 0.03 goes: an SAE trained on the Lorsa's whole-context batches (sae-contexts.yaml, not
# run here) reaches 0.815, so ~0.018 is the batches, ~0.012 the architecture; the experiments since are in lorsa.yaml.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
LM=.venv/bin/lm-saes Q=configs/quality/lorsa_molt R=.lm_saes/quality/lorsa_molt
timed() { local label=$1 start=$SECONDS; shift; "$@"; echo "[run.sh] $label: $(( SECONDS - start )) s" >&2; }
[ -d $R/activations ] || timed cache $LM generate $Q/generate.yaml
[ -d $R/heldout ] || timed heldout $LM generate $Q/generate.yaml --set 'dataset.split=train[90%:]' \
  --set output_dir=$R/heldout --set total_tokens=16384
timed sweep $LM sweep $Q/sweep.yaml
timed lorsa $LM train $Q/lorsa.yaml
for name in lorsa sae-attn molt-mlp tc-mlp; do
  [ -f $R/eval/$name.json ] || timed eval-$name $LM evaluate $Q/evaluate.yaml \
    --set sae.pretrained_name_or_path=$R/$name --set sae_name=$name --set output_path=$R/eval/$name.json > /dev/null
done
.venv/bin/python $Q/summary.py $R/eval
