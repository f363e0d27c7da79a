"""uint8 image batches onto the encoder's device, the next one copied while the current one runs.

On CUDA a batch goes through a pinned (page-locked) host buffer and a non-blocking copy on a side stream,
so the host-to-device transfer of batch k+1 overlaps the forward of batch k; two buffers take turns, and a
buffer is refilled only once its previous copy has finished. Elsewhere a batch is just a tensor: the
same calls, nothing to overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Uploaded:
    """A batch on the device, with the event its copy recorded (None: ready now)."""

    pixels: torch.Tensor
    ready: torch.cuda.Event | None = None

    def wait(self) -> torch.Tensor:
        """The pixels, once the current stream has waited for their copy."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.pixels.device)
            stream.wait_event(self.ready)
            self.pixels.record_stream(stream)  # the allocator must not reuse it before this stream is done
        return self.pixels


class HostToDevice:
    """Copies (N, 3, H, W) uint8 batches (numpy arrays or tensors) to `device`."""

    def __init__(self, device: torch.device, *, buffers: int = 2) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * buffers
        self._copied: list[torch.cuda.Event | None] = [None] * buffers
        self._turn = 0
        self._stream = torch.cuda.Stream(device) if self.pinned else None

    def upload(self, batch) -> Uploaded:
        if isinstance(batch, torch.Tensor) and batch.device.type != "cpu":
            # decoded on a device already (nvJPEG): "cuda" and "cuda:0" name the same one, so no == test
            return Uploaded(batch.to(self.device))
        if not self.pinned:
            # a Ray block may be a read-only view: torch wants a writable array
            array = batch.numpy() if isinstance(batch, torch.Tensor) else batch
            return Uploaded(torch.from_numpy(np.array(array, dtype=np.uint8)).to(self.device))
        return self._upload_pinned(batch)

    def _upload_pinned(self, batch) -> Uploaded:
        array = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        slot = self._turn
        self._turn = (self._turn + 1) % len(self._buffers)
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # its previous copy must be done before it is overwritten
        buf = self._buffers[slot]
        if buf is None or buf.numel() < array.size:
            buf = self._buffers[slot] = torch.empty(array.size, dtype=torch.uint8, pin_memory=True)
        host = buf[:array.size].view(array.shape)
        np.copyto(host.numpy(), array, casting="no")
        with torch.cuda.stream(self._stream):
            pixels = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copied[slot] = event
        return Uploaded(pixels, event)
