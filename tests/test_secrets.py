"""Nothing secret in a store or a job's output: storage options, signed URLs and URL credentials are redacted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.sources.demo import write_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "resnet18", "weights": "random:0", "layers": ["layer1"], "batch_size": 16,
        "preprocessing": {"resize_size": 32, "crop_size": 32, "interpolation": "bilinear",
                          "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
FAKE = {
    "store_secret": "FAKE-STORE-SECRET-7f3a9c",
    "store_token": "FAKE-STORE-TOKEN-1b2c3d",
    "endpoint_password": "FAKE-ENDPOINT-PASS-5e6f",
    "source_password": "FAKE-SOURCE-PASS-8a9b",
    "signature": "FAKESIGNATURE0123456789abcdef",
    "credential": "FAKECREDENTIAL42",
    "url_password": "FAKE-URL-PASS-3344",
}


def _manifest(tmp_path: Path) -> Path:
    write_shapes(tmp_path / "src", n=24, size=32, seed=3)
    images = tmp_path / "src" / "images"
    lines = ["uri,kind"]
    for p in sorted(images.glob("*.png"))[:20]:
        lines.append(f"{p.name},ok")
    # signed URLs (their files do not exist here: they become error rows whose URI and reason must be clean)
    lines.append(f"00021.png?X-Amz-Signature={FAKE['signature']}&X-Amz-Credential={FAKE['credential']},signed")
    lines.append(f"https://reader:{FAKE['url_password']}@127.0.0.1:9/img.png,userinfo")
    (images / "manifest.csv").write_text("\n".join(lines) + "\n")
    return images / "manifest.csv"


def _scan(data: bytes, where: str, hits: list) -> None:
    for name, value in FAKE.items():
        if value.encode() in data:
            hits.append(f"{name} in {where}")


def _run(cfg: dict, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "jobs.extract", "--config", str(path)], cwd=REPO, text=True,
                          capture_output=True, timeout=600, env={**os.environ, **(env or {})})


def _config(manifest: Path, root: str, storage_options: dict, **run) -> dict:
    return {"source": {"kind": "manifest", "uri": str(manifest),
                       "storage_options": {"password": FAKE["source_password"]}},
            "encoder": TINY,
            "store": {"root": root, "shard_rows": 16, "chunk_rows": 16, "storage_options": storage_options},
            "run": {"max_error_fraction": 0.5, **run}}


@pytest.mark.slow
def test_no_secret_in_a_local_store_or_the_jobs_output(tmp_path):
    manifest = _manifest(tmp_path)
    options = {"key": "FAKEKEYID", "secret": FAKE["store_secret"], "token": FAKE["store_token"],
               "client_kwargs": {"endpoint_url": f"http://admin:{FAKE['endpoint_password']}@127.0.0.1:9"}}
    cfg = _config(manifest, str(tmp_path / "stores"), options, local_max_images=0)  # through Ray Data
    proc = _run(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits: list[str] = []
    _scan(proc.stdout.encode(), "stdout", hits)
    _scan(proc.stderr.encode(), "stderr", hits)
    files = [p for p in (tmp_path / "stores").rglob("*") if p.is_file()]
    assert any(p.name.startswith("v00000001") for p in files)
    for p in files:
        _scan(p.read_bytes(), str(p.relative_to(tmp_path)), hits)
    assert hits == []
    from pipeline.stores import FeatureStore

    (featureset,) = (tmp_path / "stores").iterdir()
    store = FeatureStore(str(featureset))
    errors = store.errors().to_pandas()
    assert len(store) == 20 and len(errors) == 2
    signed = errors[errors.uri.str.contains("X-Amz-Signature")].iloc[0]
    assert "X-Amz-Signature=***" in signed.uri and signed.image_id == "00021.png"  # ids carry no signature
    assert store.info.config["store"]["storage_options"]["secret"] == "***"


@pytest.mark.s3
@pytest.mark.slow
def test_no_secret_in_an_s3_store_or_the_jobs_output(tmp_path, s3_server, s3_bucket):
    manifest = _manifest(tmp_path)
    real = s3_bucket.storage_options  # the server's own key and secret: as secret as any
    secret_values = {"s3_key": real["key"], "s3_secret": real["secret"]}
    FAKE.update(secret_values)
    try:
        cfg = _config(manifest, s3_bucket.url("features"), dict(real), local_max_images=1000)
        scrubbed_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        proc = subprocess.run([sys.executable, "-m", "jobs.extract", "--config", str(_write(tmp_path, cfg))],
                              cwd=REPO, text=True, capture_output=True, timeout=600, env=scrubbed_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        hits: list[str] = []
        _scan(proc.stdout.encode(), "stdout", hits)
        _scan(proc.stderr.encode(), "stderr", hits)
        import s3fs

        fs = s3fs.S3FileSystem(**real)
        keys = fs.find(f"{s3_bucket.name}/features")
        assert any(k.endswith("v00000001.json") for k in keys)
        for key in keys:
            _scan(fs.cat_file(key), key, hits)
        assert hits == []
    finally:
        for name in secret_values:
            FAKE.pop(name)


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
