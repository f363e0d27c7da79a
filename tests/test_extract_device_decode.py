"""JPEG bytes shipped to the encoder (run.decode: fast with GPU encoders), exercised on the CPU: the encoder
decodes them with torchvision on its own device, here the CPU, and the shard comes out as the CPU path's."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from photos import photo_jpegs
from pipeline.config import EncoderSpec
from pipeline.encoders import build_encoder
from pipeline.extract.device_decode import jpeg_for_device
from pipeline.extract.stages import decode_records, encode_row, row_to_shard
from pipeline.sources import ImageFolderSource


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    blobs = photo_jpegs(6, seed=11, sides=(200, 300))
    for i, b in enumerate(blobs):
        (root / f"{i:02d}.jpg").write_bytes(b)
    photo = Image.open(io.BytesIO(blobs[0]))
    for name, image in [("grey.jpg", photo.convert("L")), ("cmyk.jpg", photo.convert("CMYK"))]:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        (root / name).write_bytes(buf.getvalue())
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    (root / "photo.png").write_bytes(buf.getvalue())
    (root / "cut.jpg").write_bytes(blobs[1][:2000])  # a sound header, a stream cut short
    return root


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(EncoderSpec(name="resnet18", weights="random:0", layers=("layer2", "layer4")),
                         device="cpu", decode="fast")


def _shard(folder):
    source = ImageFolderSource(str(folder))
    return source, source.list_images()


def _row(records, **kwargs) -> dict:
    """A block row as the unit stage makes it: its records, then what decoding gave."""
    listed = [{"image_id": r.image_id, "uri": r.uri, "fingerprint": r.fingerprint, "split": r.split,
               "labels": dict(r.labels)} for r in records]
    return {"shard_id": 0, "row_start": 0, "unit": "", "records": json.dumps(listed),
            **decode_records(records, **kwargs)}


def test_header_check_picks_what_the_gpu_decodes(folder):
    picked = {p.name for p in folder.iterdir() if jpeg_for_device(p.read_bytes(), 10**8)}
    assert picked == {f"{i:02d}.jpg" for i in range(6)} | {"grey.jpg", "cut.jpg"}
    assert not jpeg_for_device((folder / "00.jpg").read_bytes(), 100)  # over the pixel limit: CPU path refuses


def test_shard_decoded_on_the_encoder_device_matches_the_cpu_path(folder, encoder):
    source, records = _shard(folder)
    kwargs = dict(source=source, preprocessing=encoder.preprocessing, max_pixels=10**8, decode="fast")
    shipped = _row(records, device_decode=True, **kwargs)
    assert len(shipped["jpegs"]) == 8 and shipped["pixels"].shape[0] == 2  # cmyk + png decoded on the CPU
    on_device = encode_row(encoder, shipped, batch_size=4, store_dtype=np.float32)
    on_cpu = encode_row(encoder, _row(records, **kwargs), batch_size=4, store_dtype=np.float32)

    ids = [r.image_id for r in records]
    errors = json.loads(on_device["errors"])
    assert [e["image_id"] for e in errors] == ["cut.jpg"] and errors[0]["stage"] == "decode"
    assert json.loads(on_cpu["errors"])[0]["image_id"] == "cut.jpg"
    assert list(on_device["ok"]) == list(on_cpu["ok"]) == [i != "cut.jpg" for i in ids]
    for layer in encoder.layers:
        a, b = torch.from_numpy(on_device[f"features/{layer}"]), torch.from_numpy(on_cpu[f"features/{layer}"])
        assert a.shape == b.shape == (len(ids) - 1, encoder.layer_dims[layer])
        assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999, layer
    shard_out = row_to_shard(on_device, encoder.layers)
    assert shard_out.features["layer2"].shape[0] == int(shard_out.ok.sum())
