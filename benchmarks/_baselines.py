"""The baselines bench_extract.py measures strata against, each run as a child process: the model alone over
pre-decoded tensors (`bare`, and `ceiling` in a process with the encoder actors' malloc settings), strata's own
encoder over the same tensors (`encoder`), and the tutorial DataLoader loop (`tutorial`).

Each child takes the parsed arguments (data, batch size, workers, workdir) and returns its result as a dict.
"""
from __future__ import annotations

import time
from pathlib import Path

# the workload every variant runs
ENCODER = "efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4", "blocks.6", "bn2")
IMAGE_SIZE = 224


def image_paths(data: Path) -> list[Path]:
    return sorted((data / "images").glob("*.png"))


def _encoder_spec(batch_size: int):
    from pipeline.config import EncoderSpec

    return EncoderSpec(name=ENCODER, layers=LAYERS, pooling="avg", compute_dtype="fp32", batch_size=batch_size)


def _predecoded(preprocessing, paths):
    """(N, 3, H, W) uint8 torch tensor of the images, decoded and preprocessed (untimed)."""
    import torch

    from pipeline.images import decode_rgb

    return torch.as_tensor(preprocessing.batch([decode_rgb(p.read_bytes()) for p in paths]))


def _timed_loop(fn, batches) -> float:
    fn(batches[0])  # warm-up (untimed): first-call allocations, oneDNN primitive creation
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - t0


def child_ceiling(args) -> dict:
    """`bare` and `ceiling`: the same loop; the parent starts ceiling's process with the malloc settings."""
    import torch

    from pipeline.encoders.registry import build_model, resolve_entry

    built = build_model(resolve_entry(ENCODER))
    model = built.model.eval().to(memory_format=torch.channels_last)
    paths = image_paths(Path(args.data))
    pixels = _predecoded(built.preprocessing, paths)
    bs = args.batch_size
    batches = [built.preprocessing.normalize(pixels[i:i + bs]).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(pixels), bs)]  # float32, normalised: only model(x) is left to time
    del pixels
    with torch.inference_mode():
        seconds = _timed_loop(model, batches)
    return {"images": len(paths), "seconds": seconds, "torch_threads": torch.get_num_threads()}


def child_encoder(args) -> dict:
    import torch

    from pipeline.encoders import build_encoder

    enc = build_encoder(_encoder_spec(args.batch_size), device="cpu")
    paths = image_paths(Path(args.data))
    pixels = _predecoded(enc.preprocessing, paths)
    bs = args.batch_size
    seconds = _timed_loop(enc.encode, [pixels[i:i + bs] for i in range(0, len(pixels), bs)])
    return {"images": len(paths), "seconds": seconds, "torch_threads": torch.get_num_threads(),
            "folded_bn": enc.folded_bn}


def child_tutorial(args) -> dict:
    """What most feature-extraction tutorials do, written the way they write it."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from pipeline.encoders.registry import build_model, resolve_entry

    t0 = time.perf_counter()
    built = build_model(resolve_entry(ENCODER))  # the same bundled pretrained weights strata uses
    model = built.model.eval()
    pp = built.preprocessing
    transform = T.Compose([
        T.Resize(pp.resize_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(pp.crop_size),
        T.ToTensor(),
        T.Normalize(mean=pp.mean, std=pp.std),
    ])

    class ImageFiles(Dataset):
        def __init__(self, paths, transform):
            self.paths, self.transform = paths, transform

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with Image.open(self.paths[i]) as im:
                return self.transform(im.convert("RGB"))

    paths = image_paths(Path(args.data))
    loader = DataLoader(ImageFiles(paths, transform), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    features: dict[str, list] = {name: [] for name in LAYERS}
    modules = dict(model.named_modules())

    def make_hook(name):
        def hook(_module, _inputs, output):
            features[name].append(output.mean(dim=(2, 3)).cpu().numpy())  # global average pooling
        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in LAYERS]
    with torch.no_grad():
        for batch in loader:
            model(batch)
    for h in handles:
        h.remove()
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    for name in LAYERS:
        np.save(out / f"{name}.npy", np.concatenate(features[name]).astype(np.float16))
    np.save(out / "image_ids.npy", np.array([p.name for p in paths]))
    seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds, "torch_threads": torch.get_num_threads(),
            "outputs": str(out)}
