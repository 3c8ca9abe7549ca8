#!/usr/bin/env bash
# Cloud TPU VM lifecycle for mlmjax with gcloud: create, install, run, logs, stop, fetch, delete.
#
#   launch/tpu.sh [options] create
#   launch/tpu.sh [options] install                 # this checkout (or --repo_url) + pip install -e '.[tpu]'
#   launch/tpu.sh [options] mount BUCKET [DIR]      # gcsfuse a bucket on every worker (multi-host workdirs)
#   launch/tpu.sh [options] run -- TRAIN_ARGS       # python -m mlmjax.train TRAIN_ARGS on every worker
#   launch/tpu.sh [options] logs [WORKER]           # follow a worker's log (default 0)
#   launch/tpu.sh [options] stop                    # SIGTERM: the run checkpoints and exits
#   launch/tpu.sh [options] fetch REMOTE [LOCAL]    # REMOTE: a path on worker 0 (relative = in the repo) or gs://
#   launch/tpu.sh [options] delete
#
# Options (or the environment variable in brackets):
#   --name N [TPU_NAME]  --zone Z [TPU_ZONE]  --project P [TPU_PROJECT]
#   --accelerator A [TPU_ACCELERATOR, default v5litepod-8]  e.g. v4-8, v4-32 (4 hosts), v5p-8, v6e-8
#   --version V [TPU_VERSION, default: the runtime for A's generation]  --spot [TPU_SPOT=1]
#   --repo_url URL [REPO_URL]  --branch B [REPO_BRANCH]  install clones URL instead of copying here
#   --repo_dir D [REPO_DIR, default mlmjax]  the checkout on each worker, relative to its home
#   --python PY [PYTHON, default python3]  --log F [TRAIN_LOG, default mlmjax-train.log]
#   --dry_run [DRY_RUN=1]  print every command instead of running it
set -euo pipefail

name=${TPU_NAME:-} zone=${TPU_ZONE:-} project=${TPU_PROJECT:-}
accelerator=${TPU_ACCELERATOR:-v5litepod-8} version=${TPU_VERSION:-} spot=${TPU_SPOT:-0}
repo_url=${REPO_URL:-} branch=${REPO_BRANCH:-} repo_dir=${REPO_DIR:-mlmjax}
python=${PYTHON:-python3} log=${TRAIN_LOG:-mlmjax-train.log} dry_run=${DRY_RUN:-0}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "error: $*" >&2; exit 2; }
usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

sub='' args=() train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo_url) repo_url="$2"; shift 2 ;;
    --branch) branch="$2"; shift 2 ;;
    --repo_dir) repo_dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; train_args=("$@"); break ;;
    -*) die "unknown option $1 (train arguments go after --)" ;;
    *) if [[ -z "$sub" ]]; then sub="$1"; else args+=("$1"); fi; shift ;;
  esac
done
[[ -n "$sub" ]] || usage

# Quotes a word for a POSIX shell only where needed ('it'\''s'), so dry runs read as typed commands.
q() { if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
quote_all() { local out='' w; for w in "$@"; do out+="$(q "$w") "; done; printf '%s' "${out% }"; }

# Runs a command given as words, or prints it under --dry_run.
x() {
  if [[ "$dry_run" == 1 ]]; then quote_all "$@"; echo; else "$@"; fi
}
# Runs a local shell pipeline given as one string, or prints it under --dry_run.
x_sh() {
  if [[ "$dry_run" == 1 ]]; then echo "$1"; else bash -o pipefail -c "$1"; fi
}

need_name() {
  [[ -n "$name" ]] || die "set --name (or TPU_NAME) to the TPU VM's name"
  [[ -n "$zone" ]] || die "set --zone (or TPU_ZONE), e.g. us-central2-b (v4) or us-west4-a (v5e)"
}
common=()
set_common() { common=(--zone "$zone"); [[ -z "$project" ]] || common+=(--project "$project"); }

# The TPU VM runtime (software version) for an accelerator type's generation.
default_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator $1; pass --version (gcloud compute tpus tpu-vm versions list)" ;;
  esac
}

# Runs a shell command on the given workers ('all' or an index) over gcloud ssh.
on_workers() {
  x gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$1" --command "$2"
}

if [[ "$dry_run" != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); --dry_run prints the commands"
fi

case "$sub" in
  create)
    need_name; set_common
    [[ -n "$version" ]] || version="$(default_version "$accelerator")" || exit 2
    cmd=(gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$accelerator"
         --version "$version")
    [[ "$spot" != 1 ]] || cmd+=(--spot)
    x "${cmd[@]}"
    ;;
  install)
    need_name; set_common
    pip="$python -m pip install -U pip && $python -m pip install -e '.[tpu]'"
    if [[ -n "$repo_url" ]]; then
      clone="git clone $( [[ -z "$branch" ]] || echo "--branch $(q "$branch") ")$(q "$repo_url") $(q "$repo_dir")"
      on_workers all "if [ -d $(q "$repo_dir")/.git ]; then git -C $(q "$repo_dir") pull --ff-only; else $clone; fi && cd $(q "$repo_dir") && $pip"
    else
      # This checkout as it is (tracked and untracked files, .gitignore'd ones left out).
      tarball="/tmp/mlmjax-src-$name.tgz"
      x_sh "git -C $(q "$here") ls-files -z --cached --others --exclude-standard | tar -C $(q "$here") --null -T - -czf $(q "$tarball")"
      x gcloud compute tpus tpu-vm scp "$tarball" "$name:mlmjax-src.tgz" "${common[@]}" --worker=all
      on_workers all "mkdir -p $(q "$repo_dir") && tar -xzf mlmjax-src.tgz -C $(q "$repo_dir") && cd $(q "$repo_dir") && $pip"
    fi
    ;;
  mount)
    need_name; set_common
    [[ ${#args[@]} -ge 1 ]] || die "usage: $0 mount BUCKET [MOUNT_DIR]"
    bucket="${args[0]#gs://}"; dir="${args[1]:-/mnt/$bucket}"
    install_gcsfuse="command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
    on_workers all "$install_gcsfuse && sudo mkdir -p $(q "$dir") && sudo chown \$USER $(q "$dir") && (mountpoint -q $(q "$dir") || gcsfuse --implicit-dirs $(q "$bucket") $(q "$dir"))"
    ;;
  run)
    need_name; set_common
    [[ ${#train_args[@]} -ge 1 ]] || die "usage: $0 run -- --config configs/pretrain.py:base --workdir DIR [...]"
    # Every worker starts the same command; jax.distributed finds its peers on a TPU VM by itself.
    on_workers all "cd $(q "$repo_dir") && nohup $python -m mlmjax.train $(quote_all "${train_args[@]}") > \$HOME/$(q "$log") 2>&1 < /dev/null & echo \$! > \$HOME/$(q "$log.pid")"
    ;;
  logs)
    need_name; set_common
    on_workers "${args[0]:-0}" "tail -n 200 -F \$HOME/$(q "$log")"
    ;;
  stop)
    need_name; set_common
    on_workers all "kill -TERM \$(cat \$HOME/$(q "$log.pid"))"
    ;;
  fetch)
    [[ ${#args[@]} -ge 1 ]] || die "usage: $0 fetch REMOTE_WORKDIR [LOCAL_DIR]"
    remote="${args[0]}" local_dir="${args[1]:-.}"
    if [[ "$remote" == gs://* ]]; then
      x gsutil -m rsync -r "$remote" "$local_dir/$(basename "$remote")"
    else
      need_name; set_common
      [[ "$remote" == /* ]] || remote="$repo_dir/$remote"
      x gcloud compute tpus tpu-vm scp --recurse "$name:$remote" "$local_dir" "${common[@]}" --worker=0
    fi
    ;;
  delete)
    need_name; set_common
    x gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
    ;;
  *) die "unknown subcommand $sub (create|install|mount|run|logs|stop|fetch|delete)" ;;
esac
