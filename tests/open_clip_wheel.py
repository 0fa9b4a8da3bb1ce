"""open_clip's own code, from the open_clip_torch wheel that tools/install.sh downloads.

The wheel is never installed (it would pull torchvision, whose C ops do not load beside the
pinned CPU torch). Tests extract it: `open_clip/tokenizer.py` and the BPE merges for the
tokenizer tests, the whole package for model parity. open_clip imports torchvision only for
its PIL image transforms (`open_clip/transform.py`, imported by its factory) and
`FrozenBatchNorm2d` (`open_clip/utils.py`, used when freezing ResNet towers);
`import_open_clip` registers stand-ins for exactly those names, for the duration of a
context, so that its models build and run on tensors.
"""

from __future__ import annotations

import enum
import os
import sys
import types
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

CACHE = Path(
    os.environ.get("MMSSL_OPEN_CLIP_CACHE", Path.home() / ".cache" / "mmssl_jax" / "open_clip")
)
MERGES = "open_clip/bpe_simple_vocab_16e6.txt.gz"

# What open_clip 3.x imports from torchvision (grep "torchvision" open_clip/*.py).
TRANSFORMS = ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop",
              "ColorJitter", "Grayscale")  # fmt: skip


def wheel() -> Path:
    """The cached open_clip_torch wheel; skips the calling test when it is absent."""
    wheels = sorted(CACHE.glob("open_clip_torch-*.whl"))
    if not wheels:
        pytest.skip(
            f"no open_clip_torch wheel in {CACHE} (tools/install.sh downloads it; offline "
            "it cannot): CLIP's merges file and open_clip's reference code come from it"
        )
    return wheels[-1]


def extract(out: Path, members: Sequence[str] | None = None) -> Path:
    """Extracts `members` (all of the wheel when None) under `out`; returns `out/open_clip`."""
    with zipfile.ZipFile(wheel()) as z:
        names = [n for n in z.namelist() if n.startswith("open_clip/")]
        for name in names if members is None else members:
            z.extract(name, out)
    return out / "open_clip"


class _Unavailable:
    """Stands for a torchvision class; open_clip only names these at import time."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"torchvision stand-in: {type(self).__name__} is not available in this test"
        )


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """Modules named as torchvision's, with only the names open_clip imports."""
    root = types.ModuleType("torchvision")
    root.__path__ = []  # a package, so that its submodules import
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__path__ = []
    for name in TRANSFORMS:
        setattr(transforms, name, type(name, (_Unavailable,), {}))
    # Read at definition time (default arguments) in open_clip/transform.py.
    transforms.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    functional = types.ModuleType("torchvision.transforms.functional")  # used only when called
    ops = types.ModuleType("torchvision.ops")
    ops.__path__ = []
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (_Unavailable,), {})
    root.transforms, transforms.functional, root.ops, ops.misc = transforms, functional, ops, misc
    return {m.__name__: m for m in (root, transforms, functional, ops, misc)}


@contextmanager
def import_open_clip(package_dir: Path) -> Iterator[types.ModuleType]:
    """Imports the extracted `open_clip` package with the torchvision stand-in.

    On exit sys.path is restored and open_clip's and the stand-in's modules are removed from
    sys.modules, so no other test sees a fake torchvision.
    """
    for name in ("torch", "ftfy", "regex"):
        pytest.importorskip(name, reason=f"open_clip needs {name}")
    if "torchvision" in sys.modules or "open_clip" in sys.modules:
        raise RuntimeError("torchvision or open_clip is already imported; refusing to shadow it")
    path = list(sys.path)
    sys.modules.update(_torchvision_stand_in())
    sys.path.insert(0, str(Path(package_dir).parent))
    try:
        import open_clip

        yield open_clip
    finally:
        sys.path[:] = path
        for name in [n for n in sys.modules if n.split(".")[0] in ("open_clip", "torchvision")]:
            del sys.modules[name]
