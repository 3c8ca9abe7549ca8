#!/usr/bin/env bash
# Spreads one mlmjax.sweep grid over several TPU VMs: VM i of n runs `python -m mlmjax.sweep ...
# --shard i/n`, the combinations whose index % n == i, in the background (nohup, log in ~/).
#
#   launch/sweep_tpu.sh --zone us-central2-b --vms abl-0,abl-1,abl-2 [--project P] \
#       [--repo_dir mlmjax] [--python python3] [--dry_run] -- \
#       --config configs/pretrain.py:tiny --grid masking.rate=0.15,0.3,0.4 \
#       --grid masking.strategy=token,whole_word --workdir runs/abl
#
# Everything after `--` goes to mlmjax.sweep unchanged. Each VM must already hold the repository,
# installed, at --repo_dir (relative to its home; launch/README.md). Runs land in each VM's own
# --workdir; rerunning this script after a preemption resumes every shard (finished runs are
# skipped). Collect the run directories into one folder (`gcloud compute tpus tpu-vm scp --recurse
# VM:mlmjax/runs/abl ...`) and run `python -m mlmjax.report` on it. --dry_run prints each gcloud
# command instead of running it. On a multi-host slice every worker starts the same shard.
set -euo pipefail

zone='' vms='' project='' repo_dir='mlmjax' python='python3' dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --zone) zone="$2"; shift 2 ;;
    --vms) vms="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo_dir) repo_dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (sweep arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$zone" || -z "$vms" || $# -eq 0 ]]; then
  echo "usage: $0 --zone ZONE --vms VM0,VM1,... [--project P] [--repo_dir DIR] [--python PY]" \
       "[--dry_run] -- SWEEP_ARGS" >&2
  exit 2
fi
for arg in "$@"; do
  if [[ "$arg" == --shard* ]]; then echo "error: this script sets --shard itself" >&2; exit 2; fi
done
if [[ $dry_run -eq 0 ]] && ! command -v gcloud >/dev/null; then
  echo "error: gcloud is not installed (use --dry_run to print the commands)" >&2; exit 2
fi

# Quotes a word for a POSIX shell only where needed: 'it'\''s' style, readable in --dry_run.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

IFS=',' read -r -a names <<< "$vms"
n=${#names[@]}
sweep_args=''
for arg in "$@"; do sweep_args+="$(q "$arg") "; done
for i in "${!names[@]}"; do
  log="~/sweep-shard-$i-of-$n.log"
  # repo_dir and log stay unquoted on the VM so that its shell expands `~` in them.
  remote="cd $repo_dir && nohup $python -m mlmjax.sweep ${sweep_args}--shard $i/$n > $log 2>&1 < /dev/null &"
  cmd=(gcloud compute tpus tpu-vm ssh "${names[$i]}" --zone "$zone" --worker=all --command "$remote")
  [[ -n "$project" ]] && cmd+=(--project "$project")
  if [[ $dry_run -eq 1 ]]; then
    line=''
    for word in "${cmd[@]}"; do line+="$(q "$word") "; done
    echo "${line% }"
  else
    echo "shard $i/$n -> ${names[$i]} (log $log)"
    "${cmd[@]}"
  fi
done
