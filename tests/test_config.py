"""The extraction and probe configs as a user meets them: refusals from the command line, the keys in --help,
`strata config show`, configs on any fsspec URI."""
from __future__ import annotations

import dataclasses
import typing

import fsspec
import pytest
import yaml

from clirun import assert_fails, strata
from pipeline.config import POOLINGS, SOURCE_KINDS, ConfigError, ExtractConfig, load_config
from pipeline.probes.config import HEAD_SPECS, ProbeConfig, SplitSpec, TaskSpec

USAGE = 2


@pytest.mark.parametrize("overrides, needles", [
    (["store.colour=red"], ["unknown key(s) ['colour'] in store", "'shard_rows'"]),
    (["run.keep_freed_memory=ture"], ["run.keep_freed_memory: expected true or false, got 'ture'"]),
    (["store.shard_rows=3.7"], ["store.shard_rows: expected an integer, got 3.7"]),
    (["run.max_error_fraction=lots"], ["run.max_error_fraction: expected a number"]),
    (["encoder.pooling=mean"], ["encoder.pooling: 'mean' is not a valid choice", "'multiscale'"]),
    (["store.formats=[zarr,csv]"], ["store.formats: 'csv' is not a valid choice", "['zarr', 'parquet']"]),
    (["source.kind=s3"], ["source.kind: 's3' is not a valid choice", "'manifest'"]),
    (["encoder.compute_dtype=fp64"], ["'fp64' is not a valid choice", "'bf16'"]),
    (["encoder.preprocessing={resize_size: 32}"], ["encoder.preprocessing: missing required key(s)", "crop_size"]),
    (["encoder.layer_pooling={bn2: mean}"], ["encoder.layer_pooling: 'mean' is not a valid choice"]),
    (["store.chunk_rows=100"], ["must be a multiple of store.chunk_rows"]),
    (["source.uri=x", "store.featureset=../up"], ["store.featureset '../up' is not a folder name", "no '/'"]),
    (["source.uri=x", "encoder.device=tpu"], ["encoder.device 'tpu' unknown; valid: auto, cpu, cuda"]),
    (["source.uri=x", "encoder.multiscale_grid=[0]"], ["encoder.multiscale_grid sizes must be >= 1"]),
    (["source.uri=x", "store.shard_rows=0", "store.chunk_rows=0"], ["store.shard_rows must be >= 1, got 0"]),
    (["source.uri=x", "source.options={bogus: 1}"], ["unknown option 'bogus' for source kind 'folder'", "'label_name'"]),
    (["source.kind=folder"], ["source.uri is required"]),
    (["nokey"], ["override 'nokey' must look like section.key=value"]),
    (["store.formats=[zarr"], ["override 'store.formats=[zarr': not a YAML value"]),
    (["--config", "/no/such/strata.yaml"], ["config /no/such/strata.yaml not found"]),
])
def test_extract_refuses_bad_config_in_one_line(overrides, needles):
    """Refused before Ray or torch start: a bad key or value costs a second, not a cluster start-up."""
    assert_fails(strata("extract", *overrides), USAGE, *needles)


def test_config_file_refusals(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- source\n- store\n")
    assert_fails(strata("refresh", "--config", str(listed)), USAGE, "the top level must be a mapping")
    broken = tmp_path / "broken.yaml"
    broken.write_text("store: {root: [\n")
    assert_fails(strata("extract", "--config", str(broken)), USAGE, "not valid YAML")
    section = tmp_path / "section.yaml"
    section.write_text("store: s3://bucket\n")
    assert_fails(strata("extract", "--config", str(section)), USAGE, "store: expected a mapping of keys")


@pytest.mark.parametrize("overrides, needles", [
    (["tasks=[digit]", "epochs=ten"], ["probes.epochs: expected an integer, got 'ten'"]),
    (["tasks=[digit]", "epoch=3"], ["unknown key(s) ['epoch']", "'epochs'"]),
    (["tasks=[digit]", "device=tpu"], ["probes.device: 'tpu' is not a valid choice", "'cuda'"]),
])
def test_probe_refuses_bad_config_in_one_line(tmp_path, overrides, needles):
    """Refused before the store is opened (it does not exist here)."""
    assert_fails(strata("probe", "--store", str(tmp_path / "store"), *overrides), USAGE, *needles)


def _help_keys(text: str, title: str) -> dict[str, list[str]]:
    """Rows of the key table that follows `title` in a --help text: key -> [type, default, meaning...]."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title)) + 1
    rows = {}
    for ln in lines[start:]:
        if not ln.startswith("  "):
            break
        key, *rest = ln.split()
        rows[key] = rest
    return rows


def _extract_schema_keys() -> set[str]:
    sections = typing.get_type_hints(ExtractConfig)
    return {f"{s.name}.{f.name}" for s in dataclasses.fields(ExtractConfig)
            for f in dataclasses.fields(sections[s.name])}


@pytest.mark.parametrize("command", [["extract"], ["refresh"], ["config", "show"]])
def test_help_lists_every_extract_key_with_type_default_and_meaning(command):
    proc = strata(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    rows = _help_keys(proc.stdout, "config keys")
    assert set(rows) == _extract_schema_keys()
    no_help = sorted(k for k, rest in rows.items() if len(rest) < 3)  # type, default, at least one word of meaning
    assert not no_help, f"keys without help: {no_help}; declare them with setting(default, 'one line of meaning')"
    defaults = ExtractConfig()
    assert rows["store.shard_rows"][:2] == ["int", str(defaults.store.shard_rows)]
    assert rows["run.keep_freed_memory"][:2] == ["bool", "true"]
    assert rows["encoder.weights"][:4] == ["str", "|", "null", "null"]
    assert "multiscale" in " ".join(rows["encoder.pooling"])


def test_probe_help_lists_every_probe_key():
    proc = strata("probe", "--help")
    assert proc.returncode == 0, proc.stderr
    rows = _help_keys(proc.stdout, "probe keys")
    expected = {f.name for f in dataclasses.fields(ProbeConfig)} - {"split"}
    expected |= {f"split.{f.name}" for f in dataclasses.fields(SplitSpec)}
    expected |= {f"tasks[].{f.name}" for f in dataclasses.fields(TaskSpec)} | {"heads[].kind"}
    expected |= {f"heads[{kind}].{f.name}" for kind, spec in HEAD_SPECS.items()
                 for f in dataclasses.fields(spec) if f.name != "kind"}
    assert set(rows) == expected
    assert rows["epochs"][:2] == ["int", "100"] and rows["tasks"][1] == "(required)"


def test_config_show_prints_the_effective_config_with_secrets_redacted(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "source": {"kind": "manifest", "uri": "s3://data/manifest.parquet"},
        "store": {"root": "s3://features/strata",
                  "storage_options": {"key": "AKIAEXAMPLEKEY", "secret": "hunter2-secret",
                                      "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}}}))
    proc = strata("config", "show", "--config", str(path), "store.shard_rows=2048",
                  "source.uri=s3://alice:pa55word@data/manifest.parquet")
    assert proc.returncode == 0, proc.stderr
    assert "AKIAEXAMPLEKEY" not in proc.stdout and "hunter2" not in proc.stdout and "pa55word" not in proc.stdout
    shown = yaml.safe_load(proc.stdout)
    effective = load_config(ExtractConfig, path, ["store.shard_rows=2048"]).to_dict()
    assert shown["store"]["storage_options"] == {"key": "***", "secret": "***",
                                                 "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}
    assert shown["source"]["uri"] == "s3://***@data/manifest.parquet"
    for section in ("encoder", "run"):
        assert shown[section] == effective[section]
    assert shown["store"]["shard_rows"] == 2048 and shown["store"]["root"] == "s3://features/strata"


def test_config_show_probe_config():
    proc = strata("config", "show", "--config", "configs/probes-digits.yaml", "epochs=5")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert [t["name"] for t in shown["tasks"]] == ["digit", "parity", "ge5"] and shown["epochs"] == 5
    assert ProbeConfig.from_dict(shown).epochs == 5


def test_config_from_an_fsspec_uri():
    fs = fsspec.filesystem("memory")
    fs.pipe("/strata-test/job.yaml", b"store: {shard_rows: 512, chunk_rows: 128}\nrun: {num_encoders: 2}\n")
    cfg = load_config(ExtractConfig, "memory://strata-test/job.yaml", ["run.num_encoders=3"])
    assert (cfg.store.shard_rows, cfg.run.num_encoders) == (512, 3)
    with pytest.raises(ConfigError, match="config memory://strata-test/nope.yaml not found"):
        load_config(ExtractConfig, "memory://strata-test/nope.yaml")


@pytest.mark.s3
def test_config_on_s3_through_the_cli(s3_bucket, s3_env):
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    fs.pipe(f"{s3_bucket.name}/cfg/job.yaml", b"store: {root: s3://features/x, shard_rows: 64, chunk_rows: 16}\n")
    proc = strata("config", "show", "--config", s3_bucket.url("cfg/job.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["store"]["shard_rows"] == 64


def test_choice_lists_match_the_modules_they_mirror():
    from pipeline.encoders.pooling import POOLINGS as ENCODER_POOLINGS
    from pipeline.sources import SOURCE_KINDS as SOURCES

    assert POOLINGS == ENCODER_POOLINGS and SOURCE_KINDS == tuple(SOURCES)
