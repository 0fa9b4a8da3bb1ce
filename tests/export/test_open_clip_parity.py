"""Parity with open_clip's own model code (issue 6): a randomly initialised ViT-B-16 from
`open_clip.create_model`, converted by `mmssl_jax.export.convert_torch`, gives the same image and
text embeddings on the same inputs (max |diff| <= 1e-4 in float32).

open_clip runs from the cached open_clip_torch wheel, extracted to a temporary directory and
imported with a stand-in for torchvision (tests/open_clip_wheel.py): only its image
transforms need torchvision, and the models are fed tensors here.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install -e '.[torch]')")

from input_pipeline.tokenizers.clip_bpe import ClipBpeTokenizer  # noqa: E402
from mmssl_jax.export import convert_torch  # noqa: E402
from mmssl_jax.models.model import MultimodalModel  # noqa: E402
from tests.export.test_convert_torch import pretrained, state_dict_numpy, torch_inputs  # noqa: E402
from tests.open_clip_wheel import extract, import_open_clip  # noqa: E402

TOL = 1e-4
# "!" is id 0 (also the pad id): pooling must read argmax(tokens), not the last non-zero id.
TEXTS = ["a photo of a cat.", "wow !$ a diagram of 3 dogs, naïve café"]


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory) -> Path:
    """The whole open_clip package, extracted from the cached wheel (skips without it)."""
    return extract(tmp_path_factory.mktemp("open_clip_wheel"))


def perturb_norms_and_biases(model: "torch.nn.Module", seed: int) -> None:
    """open_clip initialises LayerNorms to (1, 0) and attention biases to 0, where a swapped
    scale/bias or a misordered q/k/v bias would not show: give every 1-D parameter noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name != "visual.class_embedding":
                centre = 1.0 if name.endswith("weight") else 0.0  # LayerNorm scales
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=gen))
        model.logit_scale.fill_(3.0)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| after checking the shapes match."""
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_open_clip_vit_b16_parity(open_clip_dir):
    with import_open_clip(open_clip_dir) as open_clip:
        torch.manual_seed(0)
        ref = open_clip.create_model("ViT-B-16", pretrained=None).eval()
        reference_tokens = open_clip.get_tokenizer("ViT-B-16")(TEXTS).numpy()
    assert "torchvision" not in sys.modules  # the stand-in is gone once open_clip is built
    assert type(ref).__module__ == "open_clip.model" and ref.text_pool_type == "argmax"
    assert isinstance(ref.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    perturb_norms_and_biases(ref, seed=1)

    state = state_dict_numpy(ref)
    cfg, variables, spec = convert_torch.convert_state_dict(state, "open_clip")
    vision, text = cfg["image_overrides"], cfg["text_overrides"]
    assert (vision["width"], vision["depth"], vision["heads"], vision["patch_size"]) == (
        768, 12, 12, 16)  # fmt: skip
    assert (text["width"], text["layers"], text["heads"], text["act"]) == (512, 12, 8, "gelu")
    assert float(variables["params"]["logit_scale"]) == pytest.approx(3.0)

    # Inputs: 2 random 224x224 images; 2 rows of our CLIP BPE with the wheel's merges.
    tokens = ClipBpeTokenizer(open_clip_dir / "bpe_simple_vocab_16e6.txt.gz").encode(TEXTS, 77)
    np.testing.assert_array_equal(tokens, reference_tokens)
    assert 0 in tokens[1, 1:4]  # the "!" case is exercised
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)

    with torch.no_grad():
        ref_img = ref.encode_image(torch_inputs(images, spec)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
    model = pretrained(cfg, variables, spec)
    x = (images.astype(np.float32) / 255 - np.float32(spec["mean"])) / np.float32(spec["std"])
    img = model.model.apply(model.variables, x, method=MultimodalModel.encode_image)["emb"]
    txt = model.model.apply(model.variables, tokens, method=MultimodalModel.encode_text)["emb"]
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    diffs = {
        "image": max_diff(img, ref_img),
        "text": max_diff(txt, ref_txt),
        "image_unit": max_diff(model.encode_images(images), unit(ref_img)),
        "text_unit": max_diff(model.encode_tokens(tokens), unit(ref_txt)),
    }
    print(f"open_clip ViT-B-16 max |diff|: {diffs}")
    assert np.abs(ref_img).max() > 0.1 and np.abs(ref_txt).max() > 0.1  # not vanishing
    assert all(d <= TOL for d in diffs.values()), diffs
