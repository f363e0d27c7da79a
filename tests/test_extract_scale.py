"""The driver at scale: a dry run plans from metadata and writes nothing; progress is in images; a stalled
job names what is in flight and where, then stops so that a re-run resumes; units plan deterministically."""
from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from pipeline.cli import main
from pipeline.config import ExtractConfig, load_config
from pipeline.extract import run_extract
from pipeline.extract.refresh import run_refresh
from pipeline.extract.monitor import JobMonitor, JobStalled
from pipeline.sources import ImageFolderSource
from pipeline.sources.demo import write_shapes
from pipeline.stores import FeatureStoreWriter, label_schema
from pipeline.stores.job import plan_job
from pipeline.stores.units import UnitSpec, plan_unit
from storekit import LAYERS, PROVENANCE, target

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "store.shard_rows=16", "store.chunk_rows=16"]


@pytest.fixture
def images(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        write_shapes(tmp_path / "src" / name, n=20, size=32, seed=seed)
    return tmp_path / "src"


def test_dry_run_prints_the_plan_and_writes_nothing(images, tmp_path, capsys):
    root = tmp_path / "stores"
    line = ["source.kind=folder", f"source.uri={images}", f"store.root={root}", *TINY]
    assert main(["extract", "--dry-run", *line]) == 0
    out = capsys.readouterr().out
    assert "2 listed: 2 to work on (2 new), 0 gone, 0 unchanged" in out
    assert "images     40 new, 0 changed, 0 deleted, 0 relabelled, 0 unchanged: 40 to encode" in out
    assert "layer1" in out and "KB" in out
    assert not root.exists()  # nothing written: not even the feature set
    assert main(["extract", *line, "run.local_max_images=1000"]) == 0
    capsys.readouterr()
    write_shapes(tmp_path / "src" / "c", n=5, size=32, seed=3)
    assert main(["refresh", "--dry-run", *line]) == 0
    out = capsys.readouterr().out
    assert "3 listed: 1 to work on (1 new), 0 gone, 2 unchanged" in out
    assert "images     5 new, 0 changed, 0 deleted, 0 relabelled, 40 unchanged: 5 to encode" in out


def test_dry_run_counts_changed_images_of_a_manifest_without_fingerprints(images, tmp_path, capsys):
    """A manifest gives no content fingerprint: the dry run asks the storage about each image, as the real
    run's driver does, and says which changed rather than 'to list, diff and encode'."""
    pngs = sorted((images / "a" / "images").glob("*.png"))[:6]
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label\n" + "".join(f"{p},{'even' if k % 2 == 0 else 'odd'}\n"
                                                  for k, p in enumerate(pngs)))
    line = ["source.kind=manifest", f"source.uri={manifest}", f"store.root={tmp_path / 'stores'}", *TINY,
            "run.local_max_images=1000"]
    assert main(["extract", *line]) == 0
    pngs[0].write_bytes(pngs[1].read_bytes() + b"\0")
    manifest.write_text(manifest.read_text().replace("odd", "ODD", 1))
    capsys.readouterr()
    assert main(["refresh", "--dry-run", *line]) == 0
    out = capsys.readouterr().out
    assert "images     0 new, 1 changed, 0 deleted, 1 relabelled, 4 unchanged: 1 to encode" in out, out


def test_progress_is_logged_in_images(ray_local, images, tmp_path, caplog):
    cfg = load_config(ExtractConfig, None, ["source.kind=folder", f"source.uri={images}",
                                            f"store.root={tmp_path / 'stores'}", *TINY, "run.local_max_images=0",
                                            "run.progress_interval_s=0.2"])
    with caplog.at_level("INFO", logger="pipeline.extract.monitor"):
        summary = run_extract(cfg)
    assert summary.images == 40
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert lines and all(" of 40 (" in line and "images/s" in line for line in lines)


def test_refresh_progress_counts_only_the_images_it_encodes(ray_local, images, tmp_path, caplog):
    """A touched unit's unchanged images leave the total once its task has planned it: progress, ETA and the
    error budget are about the work to do, not the unit's size."""
    line = ["source.kind=folder", f"source.uri={images}", f"store.root={tmp_path / 'stores'}", *TINY,
            "run.local_max_images=0", "run.progress_interval_s=0.2"]
    assert run_extract(load_config(ExtractConfig, None, line)).images == 40
    for k, png in enumerate(sorted((images / "a" / "images").glob("*.png"))[:3]):
        (images / "a" / "images" / f"copy-{k}.png").write_bytes(png.read_bytes())
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.extract.monitor"):
        run_refresh(load_config(ExtractConfig, None, line))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert lines and " of 3 (" in lines[-1], lines[-3:]


class _SilentServer:
    """An HTTP server on 127.0.0.1 that accepts connections and never answers: reads through it hang."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self):
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.timeout(300)
def test_a_stalled_job_names_what_is_in_flight_and_stops(ray_local, tmp_path):
    server = _SilentServer()
    try:
        manifest = tmp_path / "m.csv"
        manifest.write_text("uri,kind\n" + "".join(f"http://127.0.0.1:{server.port}/img{i}.png,x\n" for i in range(8)))
        cfg = load_config(ExtractConfig, None, ["source.kind=manifest", f"source.uri={manifest}",
                                                f"store.root={tmp_path / 'stores'}", *TINY,
                                                "run.local_max_images=0", "run.stall_timeout_s=15"])
        t0 = time.monotonic()
        with pytest.raises(JobStalled, match=r"no block written for .* in flight: rows:\S+ on node \S+ "
                                             r"for .*run the same command again to resume"):
            run_extract(cfg)
        assert time.monotonic() - t0 < 120
    finally:
        server.close()
    assert not list((tmp_path / "stores").glob("*/_manifest/versions/*.json"))


def _interrupted_within(seconds: float) -> bool:
    """Wait as a driver blocked in Ray Data would: True once the monitor interrupts this (main) thread."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        return True
    return False


def test_a_stall_stops_a_driver_started_with_sigint_ignored(ray_local):
    """`nohup strata extract … &` starts Python with SIGINT ignored, where interrupt_main does nothing."""
    @ray_local.remote(num_cpus=0)
    class Stale:
        def status(self):
            return {"last": time.time() - 100, "images": 0, "errors": 0, "in_flight": {}}

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with JobMonitor(Stale.remote(), total=8, unknown_units=0, interval=0.1, stall_timeout=1) as watch:
            stopped = _interrupted_within(30)
        assert stopped and "no block written for" in watch.stalled
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored once the job is over
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_progress_actor_gone_for_good_stops_the_job_as_a_stall(ray_local):
    """Its node died with it (a lost worker node): the job must not wait forever on counts it cannot read."""
    @ray_local.remote(num_cpus=0)
    class Gone:
        def status(self):
            raise RuntimeError("The actor died because its node has died")

    with JobMonitor(Gone.remote(), total=8, unknown_units=0, interval=0.1, stall_timeout=1) as watch:
        stopped = _interrupted_within(30)
    assert stopped and "the job's progress could not be read for" in watch.stalled
    assert "its node has died" in watch.stalled and "run the same command again to resume" in watch.stalled


def test_units_plan_deterministically(images, tmp_path):
    source = ImageFolderSource(str(images))
    assert list(source.list_units()) == list(source.list_units())
    t = target(str(tmp_path / "s"), shard_rows=8, chunk_rows=8)
    writer = FeatureStoreWriter(t)
    units = list(source.list_units())
    records = {u.unit_id: [r.__dict__ | {"labels": dict(r.labels)} for r in source.expand(u)] for u in units}
    writer.prepare(n_rows=0, layer_dims=LAYERS, provenance=PROVENANCE,
                   labels=label_schema([r for rs in records.values() for r in rs]))
    first = plan_job(writer, units, job_id="one")
    again = plan_job(writer, units, job_id="two")  # the same work finds its reservation
    assert [w.blocks for w in first.work] == [w.blocks for w in again.work]
    for w in first.work:
        spec = UnitSpec(w.unit.unit_id, w.unit.fingerprint, w.unit.meta)
        a = plan_unit(writer, spec, records[w.unit.unit_id], w.old, w.blocks, job_id="one")
        b = plan_unit(writer, spec, records[w.unit.unit_id], w.old, w.blocks, job_id="two")
        assert [(x.block, x.row_start, x.content, [r["image_id"] for r in x.records]) for x in a.blocks] == \
            [(x.block, x.row_start, x.content, [r["image_id"] for r in x.records]) for x in b.blocks]
        assert sum(len(x.records) for x in a.blocks) == 20
