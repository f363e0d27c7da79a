"""Ray Data sink for feature stores: workers write whole shards, the driver commits the version."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import ray
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from ..stores import FeatureStoreWriter, StoreTarget
from .stages import row_to_shard

log = logging.getLogger(__name__)


class ErrorBudgetExceeded(RuntimeError):
    pass


@ray.remote(num_cpus=0)
class JobProgress:
    """Counts images and errors across tasks, and which units are in flight on which node.

    The error budget: the job stops once errors exceed the allowed fraction of the dataset the job leaves (its
    images unchanged, copied, resumed or encoded, as the final check counts them; of those known so far where
    units are of unknown size): a cluster of bad files early on, or one bad image among many moved or
    unchanged ones, does not stop a job that would end under the limit. Progress and stalls: the driver polls
    :meth:`status`.
    """

    def __init__(self, max_fraction: float, total: int, dataset: int = 0):
        import time

        self.max_fraction, self.total = max_fraction, total  # total 0: not known (units of unknown size)
        self.dataset = max(dataset, total)  # the error budget's denominator, grown as unknown units are planned
        self.images = self.errors = 0
        self.in_flight: dict[str, tuple[str, float, int]] = {}  # unit -> (node id, since, blocks left)
        self.last = time.time()
        self.ids = None  # the id hashes of CHECK_IDS units, once a task sends some

    def add(self, images: int, errors: int, unit: str = "") -> tuple[int, int, bool]:
        import time

        self.images += images
        self.errors += errors
        self.last = time.time()
        if unit in self.in_flight:
            node, since, left = self.in_flight[unit]
            if left <= 1:
                del self.in_flight[unit]
            else:
                self.in_flight[unit] = (node, since, left - 1)
        return self.images, self.errors, self.errors > self.max_fraction * max(self.dataset, self.images)

    def started(self, unit: str, node: str, blocks: int, kept: int = 0, listed: int = 0) -> None:
        """``kept``: images of a unit of known size that its plan does not encode (unchanged, copied, or in
        blocks an earlier run wrote): they leave the total, so progress and ETA count work to do. ``listed``:
        the images of a unit of unknown size, which join the error budget's dataset."""
        import time

        self.total = max(0, self.total - kept)
        self.dataset += listed
        if blocks:  # a unit is reported when its task starts (-1: still planning), then with its block count
            since = self.in_flight[unit][1] if unit in self.in_flight else time.time()
            self.in_flight[unit] = (node, since, blocks)

    def check_ids(self, unit: str, hashes) -> tuple[list[str], object]:
        """Register a planned unit's id hashes: the units that list some of them too, and those hashes."""
        if self.ids is None:
            from .id_check import IdRegistry

            self.ids = IdRegistry()
        return self.ids.add(unit, hashes)

    def status(self) -> dict:
        return {"images": self.images, "errors": self.errors, "total": self.total, "last": self.last,
                "in_flight": dict(self.in_flight)}


def write_row(writer: FeatureStoreWriter, row: dict, layers) -> dict:
    """One block row -> what the driver needs of it: the block's record (written now, or by an earlier run:
    ``resumed``) and the unit's plan when the row carries it."""
    out = {"plan": row.get("plan") or "", "record": None, "resumed": False}
    if row.get("done"):
        out |= {"record": json.loads(row["done"]), "resumed": True}
    elif int(row["shard_id"]) >= 0:
        out["record"] = writer.write_shard(row_to_shard(row, layers))
    return out


class FeatureStoreDatasink(Datasink[list]):
    def __init__(self, target: StoreTarget, layers: list[str], *, budget=None):
        self.target = target
        self.layers = list(layers)
        self.budget = budget
        self.outputs: list[dict] = []

    def get_name(self) -> str:
        return "FeatureStore"

    def write(self, blocks: Iterable[Block], ctx) -> list:
        writer = FeatureStoreWriter(self.target)
        outputs = []
        for block in blocks:
            for row in BlockAccessor.for_block(block).iter_rows(public_row_format=True):
                out = write_row(writer, row, self.layers)
                outputs.append(out)
                record = out["record"]
                if self.budget is not None:  # every row: a unit is in flight until all its rows are written
                    fresh = record is not None and not out["resumed"]
                    images, errors, exceeded = ray.get(self.budget.add.remote(
                        record["n_rows"] if fresh else 0, record["n_errors"] if fresh else 0,
                        str(row.get("unit") or "")))
                    if exceeded:
                        raise ErrorBudgetExceeded(
                            f"{errors} of {images} images failed so far, more than run.max_error_fraction "
                            f"of the whole dataset; see {self.target.uri}/errors/*.parquet. Shards committed so "
                            f"far are kept and a re-run resumes after the data is fixed."
                        )
        return outputs

    def on_write_complete(self, write_result: WriteResult[list]) -> None:
        self.outputs = [o for task in write_result.write_returns for o in task]

    def on_write_failed(self, error: Exception) -> None:
        cause = getattr(error, "cause", None) or error  # a Ray task error's own text is the remote traceback
        first = next((ln for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
        log.error("feature store write failed: %s; committed shards stay valid", first)
