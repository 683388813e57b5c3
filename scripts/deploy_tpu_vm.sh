#!/usr/bin/env bash
# Deploy jax-realtime on a Cloud TPU VM: create (or reuse) the VM, install the project with the
# tpu extra, copy a service config, install a systemd unit, start it and wait until /health
# answers (the first start compiles every shape bucket; later starts reuse the cache).
#
#   scripts/deploy_tpu_vm.sh --name asr-1 --zone us-central2-b --accelerator v4-8 \
#       --config configs/tpu-v4-8.toml [--project my-proj] [--version tpu-ubuntu2204-base] \
#       [--port 8000] [--reuse] [--dry-run]
#
# --dry-run prints every command instead of running it.  Needs gcloud (authenticated) and git.
set -euo pipefail

name=""
zone=""
accelerator="v5litepod-8"
version=""
config=""
project=""
port=8000
reuse=0
dry_run=0
health_timeout=3600
remote_dir="/opt/jax-realtime"
remote_config="/etc/jax-realtime/config.toml"
cache_dir="/var/cache/jax-realtime"

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --zone) zone="$2"; shift 2 ;;
        --accelerator) accelerator="$2"; shift 2 ;;
        --version) version="$2"; shift 2 ;;
        --config) config="$2"; shift 2 ;;
        --project) project="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --reuse) reuse=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        --health-timeout) health_timeout="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option: $1" >&2; usage 2 ;;
    esac
done

[ -n "$name" ] || { echo "--name is required" >&2; exit 2; }
[ -n "$zone" ] || { echo "--zone is required" >&2; exit 2; }
if [ -z "$config" ]; then
    case "$accelerator" in
        v4-*) config="configs/tpu-v4-8.toml" ;;
        *) config="configs/tpu-v5e-8.toml" ;;
    esac
fi
[ -f "$config" ] || { echo "config not found: $config" >&2; exit 2; }
if [ -z "$version" ]; then
    case "$accelerator" in
        v4-*) version="tpu-ubuntu2204-base" ;;
        *) version="v2-alpha-tpuv5-lite" ;;
    esac
fi

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
gcloud_args=(--zone "$zone")
[ -n "$project" ] && gcloud_args+=(--project "$project")
archive="/tmp/jax-realtime-$$.tar.gz"
unit="/tmp/jax-realtime-$$.service"

# Print a command; run it unless --dry-run.
run() {
    printf '+ %s\n' "$*"
    if [ "$dry_run" -eq 0 ]; then
        "$@"
    fi
}

ssh_vm() {
    run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command "$1"
}

# 1. The VM.
if [ "$reuse" -eq 0 ]; then
    run gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" \
        --accelerator-type "$accelerator" --version "$version"
fi

# 2. The code (the committed tree) and the config.
run git -C "$repo_root" archive --format=tar.gz --prefix=jax-realtime/ -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$config" "$name:/tmp/" "${gcloud_args[@]}" --worker=all
ssh_vm "sudo mkdir -p $remote_dir /etc/jax-realtime $cache_dir \
 && sudo tar -xzf /tmp/$(basename "$archive") -C $remote_dir --strip-components=1 \
 && sudo cp /tmp/$(basename "$config") $remote_config \
 && sudo python3 -m venv $remote_dir/.venv \
 && sudo $remote_dir/.venv/bin/pip install --upgrade pip \
 && sudo $remote_dir/.venv/bin/pip install -e '${remote_dir}[tpu]'"

# 3. The systemd unit: one worker per host; SIGTERM drains sessions within Hypercorn's graceful timeout.
if [ "$dry_run" -eq 0 ]; then
    cat > "$unit" <<EOF
[Unit]
Description=jax-realtime speech-to-text (Whisper in JAX)
After=network-online.target
Wants=network-online.target

[Service]
WorkingDirectory=$remote_dir
Environment=JAX_REALTIME_CONFIG=$remote_config
Environment=JAX_REALTIME_CACHE=$cache_dir
ExecStart=$remote_dir/.venv/bin/hypercorn -c $remote_dir/configs/hypercorn.toml --bind 0.0.0.0:$port server.app:create_app()
KillSignal=SIGTERM
TimeoutStartSec=infinity
TimeoutStopSec=90
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF
else
    echo "+ (write the systemd unit $unit: hypercorn -c $remote_dir/configs/hypercorn.toml --bind 0.0.0.0:$port)"
fi
run gcloud compute tpus tpu-vm scp "$unit" "$name:/tmp/jax-realtime.service" "${gcloud_args[@]}" --worker=all
ssh_vm "sudo cp /tmp/jax-realtime.service /etc/systemd/system/jax-realtime.service \
 && sudo systemctl daemon-reload && sudo systemctl enable --now jax-realtime"

# 4. Wait until it serves (compilation happens before the first connection is accepted).
ssh_vm "for i in \$(seq 1 $health_timeout); do curl -fsS http://127.0.0.1:$port/health && exit 0; sleep 1; done; \
 sudo journalctl -u jax-realtime -n 50 --no-pager; exit 1"

if [ "$dry_run" -eq 0 ]; then
    rm -f "$archive" "$unit"
fi
echo "jax-realtime is serving on $name:$port (ws://<external-ip>:$port/v1/realtime)"
