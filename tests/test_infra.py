"""infra/ and configs/ stay runnable: YAML parses, commands parse with the real CLI, configs validate.

Fast and offline: no cluster, no Kubernetes, no S3 (``validate_extract`` and ``build_source`` do no I/O).
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import ExtractConfig, load_config, validate_extract

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
YAML_FILES = sorted({*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"),
                     *(REPO / "configs").glob("*.yaml"), *(REPO / "configs").glob("*.yml")})
CRONTAB = INFRA / "cron" / "strata.crontab"
RAYJOB = INFRA / "k8s" / "rayjob-extract.yaml"
CRONJOB = INFRA / "k8s" / "cronjob-refresh.yaml"
CLUSTER = INFRA / "ray" / "cluster.yaml"
S3_CONFIG = REPO / "configs" / "s3-example.yaml"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "STRATA_S3_ENDPOINT_URL")
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = re.compile(r"^\d*(>>?|<|>&|&>)")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_one(path: Path) -> Any:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return doc


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


# --- commands ----------------------------------------------------------------------------------

def job_invocations(command: str | list[str]) -> list[tuple[str, list[str]]]:
    """Every ``python -m jobs.X ARGS`` in a shell line or an argv (``ray job submit ... -- python ...``,
    ``bash -c '...'``, ``cd dir && .venv/bin/python ...``, redirections dropped), as (module, ARGS)."""
    if isinstance(command, list):
        tokens = list(command)
    else:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    found, segment = [], []
    for tok in [*tokens, ";"]:
        if tok not in SHELL_SEPARATORS:
            segment.append(tok)
            continue
        argv = []
        for t in segment:
            if REDIRECTIONS.match(t):  # `>> log 2>&1`: the rest of the segment is redirection
                if argv and argv[-1].isdigit():  # the `2` of `2>err`
                    argv.pop()
                break
            argv.append(t)
        segment = []
        for i, t in enumerate(argv):
            if t == "-c" and i and Path(argv[i - 1]).name in ("sh", "bash") and i + 1 < len(argv):
                found += job_invocations(argv[i + 1])
                break
            if (re.fullmatch(r"python(3(\.\d+)?)?", Path(t).name) and argv[i + 1:i + 2] == ["-m"]
                    and i + 2 < len(argv) and argv[i + 2].startswith("jobs.")):
                found.append((argv[i + 2], argv[i + 3:]))
                break
    return found


def check_job_command(module: str, args: list[str], *, workdir: Path = REPO) -> ExtractConfig:
    """The module exists, is a thin wrapper over the matching CLI subcommand, its arguments parse
    with the real parser, and the config it names exists in the repository, loads and validates."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    assert Path(spec.origin).resolve().is_relative_to(REPO), spec.origin
    subcommand = module.removeprefix("jobs.").replace("_", "-")
    assert re.search(rf"main\(\[\s*[\"']{re.escape(subcommand)}[\"']", Path(spec.origin).read_text()), (
        f"{module} does not call pipeline.cli.main([{subcommand!r}, ...])")
    try:
        ns = build_parser().parse_args([subcommand, *args])
    except SystemExit as e:  # argparse exits on a bad command line
        pytest.fail(f"python -m {module} {shlex.join(args)}: the strata parser refused it (exit {e.code})")
    assert ns.command == subcommand
    assert ns.config, f"python -m {module} {shlex.join(args)} names no --config"
    path = workdir / ns.config
    assert path.is_file(), f"{ns.config} (from python -m {module}) is not in the repository"
    cfg = load_config(ExtractConfig, path, ns.overrides)
    validate_extract(cfg)
    from pipeline.extract.plan import build_source

    build_source(cfg.source)  # option names are checked; a manifest is not read until listing
    return cfg


def test_job_invocations_parser() -> None:
    line = "cd /opt/x && .venv/bin/python -m jobs.refresh --config c.yaml a.b=1 >> /var/log/x.log 2>&1"
    assert job_invocations(line) == [("jobs.refresh", ["--config", "c.yaml", "a.b=1"])]
    assert job_invocations(["ray", "job", "submit", "--", "python3", "-m", "jobs.extract", "--config", "c"]) == [
        ("jobs.extract", ["--config", "c"])]
    assert job_invocations(["bash", "-c", "python -m jobs.extract --config c; echo done"]) == [
        ("jobs.extract", ["--config", "c"])]
    assert job_invocations("python -m pytest -q") == []


def test_bad_command_is_refused() -> None:
    with pytest.raises(BaseException):
        check_job_command("jobs.refresh", ["--config", "configs/does-not-exist.yaml"])
    with pytest.raises(BaseException):
        check_job_command("jobs.refresh", ["--bogus"])


# --- every YAML --------------------------------------------------------------------------------

def test_expected_files_exist() -> None:
    for path in (CLUSTER, RAYJOB, CRONJOB, CRONTAB, S3_CONFIG, INFRA / "README.md", INFRA / "s3" / "seaweedfs.sh"):
        assert path.is_file(), rel(path)


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{rel(path)}: expected mapping documents"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=rel)
def test_configs_validate(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if "probes" in data:  # a probe grid config (strata probe --config)
        from pipeline.probes.config import ProbeConfig

        ProbeConfig.from_dict(data["probes"])
    else:
        validate_extract(load_config(ExtractConfig, path))


# --- Ray cluster launcher ----------------------------------------------------------------------

def _pinned(dist: str) -> str:
    """The exact version constraints.txt pins (pyproject.toml holds ranges); images and clusters run it."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    (pin,) = [ln for ln in lines if re.match(rf"{re.escape(dist)}==", ln.strip(), re.IGNORECASE)]
    return pin.split("==", 1)[1].strip()


def test_cluster_yaml_passes_ray_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_one(CLUSTER)
    config = prepare_config(raw)
    validate_config(config)  # Ray's own JSON schema for `ray up`
    assert config["provider"]["type"] == "aws"

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head.get("resources", {}).get("GPU"), "the head is a CPU node"
    gpu_types = [t for name, t in types.items() if t.get("resources", {}).get("GPU") == 1]
    assert gpu_types, "a worker node type with resources {GPU: 1}"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
        assert t["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p5."))

    # The repository is synced from where `ray up` runs (the repo root) and installed from there.
    ((remote, local),) = raw["file_mounts"].items()
    assert (REPO / local).resolve() == REPO
    setup = " && ".join(config["setup_commands"])
    assert f"cd {remote}" in setup and "pip install -c constraints.txt -e '.[cluster]'" in setup
    assert f"torch=={_pinned('torch')}" in setup and f"torchvision=={_pinned('torchvision')}" in setup
    for image in (raw["docker"]["head_image"], raw["docker"]["worker_image"]):
        assert f":{_pinned('ray')}-py311" in image, f"{image}: Ray and Python as constraints.txt pins"


def test_cluster_yaml_submit_commands() -> None:
    lines = [ln.lstrip("# ").strip() for ln in CLUSTER.read_text().splitlines() if ln.lstrip().startswith("#")]
    assert any(ln.startswith("ray up infra/ray/cluster.yaml") for ln in lines)
    submits = [ln for ln in lines if ln.startswith("ray job submit")]
    assert submits
    modules = []
    for ln in submits:
        assert "--address" in ln and "--working-dir ." in ln
        for module, args in job_invocations(ln):
            check_job_command(module, args)
            modules.append(module)
    assert "jobs.extract" in modules


# --- Kubernetes --------------------------------------------------------------------------------

def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _assert_secret_env(container: dict) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    for name in SECRET_ENV:
        assert name in env, f"container {container['name']}: no {name}"
        assert "value" not in env[name], f"container {container['name']}: {name} has a literal value"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"]


def test_rayjob() -> None:
    doc = load_one(RAYJOB)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    invocations = job_invocations(spec["entrypoint"])
    assert [m for m, _ in invocations] == ["jobs.extract"]
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    assert "env_vars" not in runtime_env, "no secrets in the runtime env (the dashboard shows it)"
    for module, args in invocations:
        assert args[:2] == ["--config", "configs/s3-example.yaml"]
        check_job_command(module, args)

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned("ray") == version("ray")
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = cluster["workerGroupSpecs"]
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head["containers"])
    gpu_groups = [g for g in workers
                  if any(str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) == "1"
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "a worker group with nvidia.com/gpu: 1 limits"
    cfg = load_config(ExtractConfig, S3_CONFIG)
    assert sum(g["replicas"] for g in gpu_groups) >= cfg.run.num_encoders
    images = set()
    for pod in [head, *(g["template"]["spec"] for g in workers)]:
        for c in _containers(pod):
            _assert_secret_env(c)
            images.add(c["image"])
    assert images == {"ghcr.io/your-org/strata:0.1.0"}


def test_cronjob() -> None:
    doc = load_one(CRONJOB)
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert spec["schedule"] == "0 2 * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    _assert_secret_env(container)
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1].startswith("http://") and "--working-dir" in argv
    invocations = job_invocations(argv)
    assert [m for m, _ in invocations] == ["jobs.refresh"]
    for module, args in invocations:
        check_job_command(module, args)


# --- crontab -----------------------------------------------------------------------------------

CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _cron_field_ok(field: str, lo: int, hi: int) -> bool:
    for part in field.split(","):
        m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        if not m:
            return False
        nums = [int(n) for n in m.group(2, 3, 4)[:2] if n is not None]
        if any(not lo <= n <= hi for n in nums) or (m.group(4) is not None and int(m.group(4)) < 1):
            return False
    return True


def test_crontab() -> None:
    entries = [ln for ln in CRONTAB.read_text().splitlines()
               if ln.strip() and not ln.lstrip().startswith("#")
               and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", ln)]  # VAR=value lines
    assert entries, "no crontab entry"
    for line in entries:
        fields = line.split(None, 5)
        assert len(fields) == 6, f"not 5 schedule fields + command: {line!r}"
        for field, (lo, hi) in zip(fields[:5], CRON_FIELDS):
            assert _cron_field_ok(field, lo, hi), f"bad schedule field {field!r} in {line!r}"
        command = fields[5]
        assert "%" not in command, "cron turns % into a newline"
        invocations = job_invocations(command)
        assert [m for m, _ in invocations] == ["jobs.refresh"]
        for module, args in invocations:
            check_job_command(module, args)
    assert entries[0].split(None, 5)[:5] == ["0", "2", "*", "*", "*"]


# --- docs --------------------------------------------------------------------------------------

def test_readme_commands() -> None:
    text = (INFRA / "README.md").read_text()
    for rel_path in re.findall(r"`((?:ray|k8s|cron|s3)/[\w./-]+)`", text):
        assert (INFRA / rel_path).exists(), f"infra/README.md names infra/{rel_path}"
    checked = 0
    for line in text.splitlines():
        if "-m jobs." in line:
            for module, args in job_invocations(line):
                check_job_command(module, args)
                checked += 1
    assert checked


# --- secrets -----------------------------------------------------------------------------------

SECRETISH_KEY = re.compile(r"(secret|password|passwd|token|access_key|private_key|credential)", re.I)
TEXT_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", re.I),
    re.compile(r"(SECRET|PASSWORD|TOKEN)[A-Z_]*=(?![\"']?\$)['\"]?[^\s\"'$]{8,}"),  # KEY=literal, not KEY="$VAR"
]
ALL_INFRA_TEXT = sorted({*YAML_FILES, CRONTAB, INFRA / "README.md"})


@pytest.mark.parametrize("path", ALL_INFRA_TEXT, ids=rel)
def test_no_secret_values(path: Path) -> None:
    text = path.read_text()
    for pattern in TEXT_SECRETS:
        m = pattern.search(text)
        assert m is None, f"{rel(path)}: looks like a secret: {m.group(0)[:12]}..."
    if path.suffix not in (".yaml", ".yml"):
        return
    for doc in yaml.safe_load_all(text):
        for node in walk(doc):
            if not isinstance(node, dict):
                continue
            for key, value in node.items():
                if SECRETISH_KEY.search(str(key)) and isinstance(value, (str, int)) and str(value):
                    pytest.fail(f"{rel(path)}: {key}: has a literal value")
            name = str(node.get("name", ""))
            if "value" in node and (SECRETISH_KEY.search(name) or name in SECRET_ENV):
                pytest.fail(f"{rel(path)}: env {name} has a literal value; use valueFrom.secretKeyRef")


def test_s3_config_names_s3_and_no_credentials() -> None:
    cfg = load_config(ExtractConfig, S3_CONFIG)
    assert cfg.store.root == "s3://features/strata"
    assert cfg.source.kind == "manifest" and cfg.source.uri == "s3://datasets/my-images/manifest.parquet"
    assert cfg.encoder.name == "efficientnet_lite0" and cfg.run.num_encoders == 4
    for options in (cfg.store.storage_options, cfg.source.storage_options, cfg.source.options):
        keys = [k for node in walk(dict(options)) if isinstance(node, dict) for k in node]
        bad = [k for k in keys if SECRETISH_KEY.search(str(k)) or k in ("key", "secret")]  # s3fs credential keys
        assert not bad, f"credentials in {rel(S3_CONFIG)}: {bad}"
