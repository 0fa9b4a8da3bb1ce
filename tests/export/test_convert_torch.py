"""PyTorch weight import: parity with reference PyTorch models on the same inputs.

The reference models here are small PyTorch modules written from the published layouts
with the exact state-dict names: OpenAI CLIP / open_clip's `VisionTransformer` + text
transformer (built on `torch.nn.MultiheadAttention`, PyTorch's own attention) and SLIP's timm
ViT + CLIP text tower + SimCLR MLP with BatchNorm. They are randomly initialised (norm scales
and BN statistics too, so a swapped or transposed weight shows), converted, and compared at
max |diff| <= 1e-4 in float32. open_clip's own ViT-B-16 is compared in
tests/export/test_open_clip_parity.py (its code from the cached wheel); timm, which SLIP builds on,
imports torchvision, which does not import beside the pinned CPU torch.
"""

import argparse
import math
from collections import OrderedDict

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install -e '.[torch]')")
nn = torch.nn

from mmssl_jax.export import PretrainedModel, convert_torch, load_pretrained  # noqa: E402
from mmssl_jax.models.model import MultimodalModel  # noqa: E402
from mmssl_jax.models.registry import build_model  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TOL = 1e-4


# ----------------------------------------------------------------------------- references


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP / open_clip block: ln_1, attn (in_proj + out_proj), ln_2, mlp.c_fc/c_proj."""

    def __init__(self, width, heads, act):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", act()),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask=None):  # x: [L, N, D] as in OpenAI's code
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, act) for _ in range(layers)]
        )

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class ClipVisual(nn.Module):
    """OpenAI CLIP's VisionTransformer (open_clip's with its default options)."""

    def __init__(self, image_size, patch, width, layers, heads, out_dim, act):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = image_size // patch
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class ClipTextMixin:
    """CLIP's text tower, shared by CLIP and SLIP (attribute names are the state-dict keys)."""

    def build_text(self, vocab, context, width, layers, heads, embed_dim, act):
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width**-0.5 * torch.randn(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


class Clip(nn.Module, ClipTextMixin):
    def __init__(self, *, image_size, patch, vwidth, vlayers, vheads, embed_dim, vocab,
                 context, twidth, tlayers, theads, act):  # fmt: skip
        super().__init__()
        self.visual = ClipVisual(image_size, patch, vwidth, vlayers, vheads, embed_dim, act)
        self.build_text(vocab, context, twidth, tlayers, theads, embed_dim, act)

    def encode_image(self, x):
        return self.visual(x)


class TimmAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = TimmAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = TimmMlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)


class TimmViT(nn.Module):
    """timm VisionTransformer(num_classes=0): the feature is the normed class token."""

    def __init__(self, image_size, patch, width, depth, heads):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.Sequential(*[TimmBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


class Slip(nn.Module, ClipTextMixin):
    """SLIP's models.SLIP: timm visual + image_projection + CLIP text tower + image_mlp."""

    def __init__(self, *, image_size, patch, vwidth, vlayers, vheads, embed_dim, vocab,
                 context, twidth, tlayers, theads, mlp_dim, ssl_dim):  # fmt: skip
        super().__init__()
        self.visual = TimmViT(image_size, patch, vwidth, vlayers, vheads)
        self.image_projection = nn.Parameter(vwidth**-0.5 * torch.randn(vwidth, embed_dim))
        self.build_text(vocab, context, twidth, tlayers, theads, embed_dim, QuickGELU)
        self.image_mlp = nn.Sequential(
            OrderedDict(
                [
                    ("layer1", nn.Linear(vwidth, mlp_dim)),
                    ("bn1", nn.BatchNorm1d(mlp_dim)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("layer2", nn.Linear(mlp_dim, mlp_dim)),
                    ("bn2", nn.BatchNorm1d(mlp_dim)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("layer3", nn.Linear(mlp_dim, ssl_dim)),
                ]
            )
        )

    def encode_image(self, x):
        return self.visual(x) @ self.image_projection

    def ssl_embed(self, x):
        return self.image_mlp(self.visual(x))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere: norm scales around 1, BN statistics, small weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 0:
                p.fill_(2.0)  # logit_scale
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scale
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("embedding") or name.endswith("projection") or name.endswith("proj"):
                p.copy_(p.shape[-1] ** -0.5 * noise if p.ndim == 2 else 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


SMALL = dict(image_size=32, patch=8, vwidth=128, vlayers=2, vheads=2, embed_dim=96, vocab=500,
             context=16, twidth=128, tlayers=2, theads=2)  # fmt: skip


def images_and_tokens(image_size, context, vocab, n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    tokens = np.zeros((n, context), np.int32)
    for i, length in enumerate(rng.integers(1, context - 1, n)):
        tokens[i, 0] = vocab - 2  # SOT
        tokens[i, 1 : length + 1] = rng.integers(1, vocab - 2, length)
        tokens[i, length + 1] = vocab - 1  # EOT: the highest id, where CLIP pools
    return images, tokens


def torch_inputs(images: np.ndarray, spec: dict) -> "torch.Tensor":
    x = images.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.float32(spec["mean"])) / np.float32(spec["std"])
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def state_dict_numpy(model: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def pretrained(cfg, variables, spec) -> PretrainedModel:
    config = {"model": cfg, "embed_dim": cfg["embed_dim"], "logit_scale": 1.0,
              "text_length": cfg.get("context_length")}  # fmt: skip
    return PretrainedModel(build_model(cfg), variables, config, spec)


def assert_parity(ref, model: PretrainedModel, images, tokens, spec):
    """Raw and L2-normalised image/text embeddings agree within TOL."""
    with torch.no_grad():
        ref_img = ref.encode_image(torch_inputs(images, spec)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
    x = (images.astype(np.float32) / 255 - np.float32(spec["mean"])) / np.float32(spec["std"])
    raw_img = model.model.apply(model.variables, x, method=MultimodalModel.encode_image)["emb"]
    raw_txt = model.model.apply(model.variables, tokens, method=MultimodalModel.encode_text)
    np.testing.assert_allclose(raw_img, ref_img, atol=TOL, rtol=0)
    np.testing.assert_allclose(raw_txt["emb"], ref_txt, atol=TOL, rtol=0)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    np.testing.assert_allclose(model.encode_images(images), unit(ref_img), atol=TOL, rtol=0)
    np.testing.assert_allclose(model.encode_tokens(tokens), unit(ref_txt), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch,act", [("openai", QuickGELU), ("open_clip", nn.GELU)])
def test_clip_parity(arch, act):
    ref = randomize(Clip(**SMALL, act=act), seed=1)
    state = state_dict_numpy(ref)
    assert "attn_mask" not in state  # open_clip: a non-persistent buffer
    cfg, variables, spec = convert_torch.convert_state_dict(state, arch)
    assert convert_torch.TOKENIZER_TRUNCATION[arch] == "keep_eot"
    assert cfg["image_overrides"]["act"] == cfg["text_overrides"]["act"]
    assert spec["resample"] == "bicubic" and spec["mean"][0] == pytest.approx(0.48145466)
    images, tokens = images_and_tokens(32, 16, 500)
    model = pretrained(cfg, variables, spec)
    assert_parity(ref, model, images, tokens, spec)
    assert float(variables["params"]["logit_scale"]) == pytest.approx(2.0)
    # The comparison can fail: the other activation, or wrong head counts, is caught.
    other = "open_clip" if arch == "openai" else "openai"
    wrong = pretrained(*convert_torch.convert_state_dict(state, other))
    assert np.abs(wrong.encode_tokens(tokens) - model.encode_tokens(tokens)).max() > 10 * TOL
    wrong = pretrained(*convert_torch.convert_state_dict(state, arch, vision_heads=4))
    assert np.abs(wrong.encode_images(images) - model.encode_images(images)).max() > 10 * TOL


def test_slip_checkpoint_file_parity(tmp_path):
    """A SLIP-format file (DDP `module.` keys, `state_dict`, argparse args) -> export dir."""
    dims = dict(SMALL, vwidth=96, vheads=3, mlp_dim=64, ssl_dim=32)
    ref = randomize(Slip(**dims), seed=2)
    checkpoint = {
        "epoch": 3,
        "arch": "SLIP_VITS16",
        "state_dict": {"module." + k: v for k, v in ref.state_dict().items()},
        "args": argparse.Namespace(model="SLIP_VITS16", ssl_mlp_dim=64),
    }
    path = tmp_path / "checkpoint_best.pt"
    torch.save(checkpoint, path)
    out = tmp_path / "export"
    tool = _tool("convert_torch")
    assert tool.main([f"--checkpoint={path}", f"--output={out}", "--vision_heads=3"]) == 0
    model = load_pretrained(str(out))
    spec = model.preprocess
    assert spec["resample"] == "bilinear" and spec["mean"] == [0.485, 0.456, 0.406]
    assert model.config["source"]["arch"] == "slip"
    assert model.config["tokenizer_truncation"] == "cut"  # SLIP's tokenizer, recorded
    with pytest.raises(ValueError, match="no tokenizer.model.*encode_tokens"):
        model.encode_texts(["a photo of a cat"])  # CLIP's BPE ids are the user's to make
    assert model.logit_scale == pytest.approx(math.exp(2.0), rel=1e-6)
    images, tokens = images_and_tokens(32, 16, 500, n=4, seed=1)
    assert_parity(ref, model, images, tokens, spec)
    # SimCLR head: BatchNorm with the running statistics (eval mode).
    with torch.no_grad():
        ref_ssl = ref.ssl_embed(torch_inputs(images, spec)).numpy()
    x = (images.astype(np.float32) / 255 - np.float32(spec["mean"])) / np.float32(spec["std"])
    ssl = model.model.apply(model.variables, x, method=MultimodalModel.ssl_project)
    np.testing.assert_allclose(ssl, ref_ssl, atol=TOL, rtol=0)


def test_clip_b16_size_conversion(tmp_path):
    """OpenAI ViT-B/16 at full size: the registry's B/16 + CLIP text tower, same numbers."""
    dims = dict(image_size=224, patch=16, vwidth=768, vlayers=12, vheads=12, embed_dim=512,
                vocab=49408, context=77, twidth=512, tlayers=12, theads=8)  # fmt: skip
    torch.manual_seed(0)
    ref = Clip(**dims, act=QuickGELU).eval()
    with torch.no_grad():  # non-trivial norms without the cost of randomize() at this size
        for module in ref.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    path = tmp_path / "ViT-B-16.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    state = convert_torch.load_state_dict(str(path))
    cfg, variables, spec = convert_torch.convert_state_dict(state, "openai")
    image_cfg, text_cfg = cfg["image_overrides"], cfg["text_overrides"]
    assert (image_cfg["width"], image_cfg["depth"], image_cfg["heads"]) == (768, 12, 12)
    assert (image_cfg["patch_size"], image_cfg["image_size"]) == (16, 224)
    assert (text_cfg["width"], text_cfg["layers"], text_cfg["heads"]) == (512, 12, 8)
    assert (cfg["vocab_size"], cfg["context_length"], cfg["embed_dim"]) == (49408, 77, 512)
    n_torch = sum(p.numel() for p in ref.parameters())
    n_jax = sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
    assert n_jax == n_torch + 1  # + logit_bias, which CLIP does not have
    images, tokens = images_and_tokens(224, 77, 49408, n=1)
    assert_parity(ref, pretrained(cfg, variables, spec), images, tokens, spec)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_conversion_errors(tmp_path):
    ref = randomize(Clip(**SMALL, act=QuickGELU), seed=3)
    state = state_dict_numpy(ref)
    extra = dict(state, **{"visual.transformer.resblocks.0.ls_1.gamma": np.ones(128, np.float32)})
    with pytest.raises(convert_torch.ConversionError, match=r"no place .*ls_1\.gamma"):
        convert_torch.convert_state_dict(extra, "openai")
    missing = {k: v for k, v in state.items() if k != "visual.ln_pre.weight"}
    with pytest.raises(convert_torch.ConversionError, match=r"no visual\.ln_pre\.weight"):
        convert_torch.convert_state_dict(missing, "openai")
    with pytest.raises(convert_torch.ConversionError, match="timm visual tower"):
        convert_torch.convert_state_dict(state, "slip")
    with pytest.raises(convert_torch.ConversionError, match="not a CLIP"):
        convert_torch.convert_state_dict({"fc.weight": np.zeros((2, 2))}, "auto")

    # TorchScript archives (OpenAI's released .pt) would run code: refused with a recipe.
    scripted = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    with pytest.raises(convert_torch.ConversionError, match="TorchScript"):
        convert_torch.load_state_dict(str(scripted))
    # Arbitrary pickled objects are refused by torch.load(weights_only=True).
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Unpicklable()}, evil)
    with pytest.raises(convert_torch.ConversionError, match="weights_only"):
        convert_torch.load_state_dict(str(evil))


class Unpicklable:
    """Any class outside torch's weights-only allowlist."""


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
