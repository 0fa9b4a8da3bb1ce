"""ResNet of basic blocks (ResNet-18, the 32 px ResNet-10): torchvision's parameter count, the
3x3 stem's shapes, and outputs equal to a hand-built PyTorch ResNet on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax.models import registry
from mmssl_jax.models.resnet import ResNet

KEY = jax.random.key(0, impl="rbg")


def n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_resnet18_param_count_matches_torchvision_without_fc():
    # torchvision resnet18: 11,689,512 parameters, of which the 512 x 1000 fc (+bias) 513,000.
    enc = registry.get_image_encoder("resnet18")
    out, variables = jax.eval_shape(enc.init_with_output, KEY, jnp.zeros((1, 224, 224, 3)))
    assert n_params(variables["params"]) == 11_176_512
    assert out["feature"].shape == (1, 512)
    assert [b.shape[-1] for b in out["blocks"]] == [64, 128, 256, 512]
    assert out["grid"].shape == (1, 7, 7, 512)


def test_cifar_stem_keeps_32px_resolution_into_stage_one():
    enc = registry.get_image_encoder("resnet10_32")
    out, variables = jax.eval_shape(enc.init_with_output, KEY, jnp.zeros((2, 32, 32, 3)))
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert out["feature"].shape == (2, 256)
    assert out["grid"].shape == (2, 4, 4, 256)  # 32 -> 32 -> 16 -> 8 -> 4


def test_bad_block_or_stem_names_the_valid_ones():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="basic"):
        jax.eval_shape(ResNet(block="basik").init, KEY, x)
    with pytest.raises(ValueError, match="cifar"):
        jax.eval_shape(ResNet(stem="tiny").init, KEY, x)


def _torch_resnet(torch, stage_sizes, width, cifar: bool):
    """torchvision's ResNet of BasicBlocks (v1.5 strides), written out by hand, with the stem
    switch: a reference that shares no code with the Flax module."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu((x if self.downsample is None else self.downsample(x)) + y)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            k, s, p = (3, 1, 1) if cifar else (7, 2, 3)
            self.conv1 = nn.Conv2d(3, width, k, s, p, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.pool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
            cin, self.stages = width, nn.ModuleList()
            for i, count in enumerate(stage_sizes):
                planes, blocks = width * 2**i, []
                for j in range(count):
                    blocks.append(Block(cin, planes, 2 if i > 0 and j == 0 else 1))
                    cin = planes
                self.stages.append(nn.Sequential(*blocks))

        def forward(self, x):
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            for stage in self.stages:
                x = stage(x)
            return x.mean(dim=(2, 3))

    return Net()


def _load(torch, conv, bn, params, stats, prefix=""):
    """Flax conv kernel [kh, kw, in, out] -> torch [out, in, kh, kw]; BN scale/bias/stats."""
    conv.weight.data = torch.from_numpy(
        np.asarray(params[f"{prefix}conv"]["kernel"]).transpose(3, 2, 0, 1).copy()
    )
    bn.weight.data = torch.from_numpy(np.asarray(params[f"{prefix}bn"]["scale"]).copy())
    bn.bias.data = torch.from_numpy(np.asarray(params[f"{prefix}bn"]["bias"]).copy())
    bn.running_mean.data = torch.from_numpy(np.asarray(stats[f"{prefix}bn"]["mean"]).copy())
    bn.running_var.data = torch.from_numpy(np.asarray(stats[f"{prefix}bn"]["var"]).copy())


@pytest.mark.parametrize("cifar", [True, False])
def test_matches_a_hand_built_pytorch_resnet(cifar):
    torch = pytest.importorskip("torch")
    stage_sizes, width, size = (2, 1), 8, 32
    enc = ResNet(stage_sizes, width, block="basic", stem="cifar" if cifar else "imagenet")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    variables = jax.jit(enc.init)(KEY, x)
    # Non-trivial BN statistics and scales (zero-init residual would hide the second conv).
    variables = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), variables
    )
    params, stats = variables["params"], variables["batch_stats"]
    ref = _torch_resnet(torch, stage_sizes, width, cifar).eval()
    rename = lambda tree, pairs: {new: tree[old] for old, new in pairs}
    stem = [("conv1", "conv"), ("bn1", "bn")]
    _load(torch, ref.conv1, ref.bn1, rename(params, stem), rename(stats, [("bn1", "bn")]))
    for i, stage in enumerate(ref.stages):
        for j, block in enumerate(stage):
            p, s = params[f"layer{i + 1}_{j}"], stats[f"layer{i + 1}_{j}"]
            for n in ("1", "2"):
                pairs = [(f"conv{n}", "conv"), (f"bn{n}", "bn")]
                _load(
                    torch,
                    getattr(block, f"conv{n}"),
                    getattr(block, f"bn{n}"),
                    rename(p, pairs),
                    rename(s, [(f"bn{n}", "bn")]),
                )
            if block.downsample is not None:
                pairs = [("downsample_conv", "conv"), ("downsample_bn", "bn")]
                _load(
                    torch,
                    block.downsample[0],
                    block.downsample[1],
                    rename(p, pairs),
                    rename(s, [("downsample_bn", "bn")]),
                )
    got = jax.jit(lambda v, x: enc.apply(v, x)["feature"])(variables, x)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
