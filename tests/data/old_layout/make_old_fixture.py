"""Run with the OLD layout's code (main at 4165942) to write a checkpoint + export fixture."""

import json
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
sys.path.insert(0, os.getcwd())
import numpy as np

from configs.tiny_slip import get_config
from mmssl_jax.export import export_checkpoint, load_pretrained
from mmssl_jax.train import Trainer

out = sys.argv[1]
data = os.path.abspath("data")
c = get_config(f"data={data}")
c.model.image_overrides = {"width": 16, "depth": 1, "heads": 2, "patch_size": 8}
c.model.text_overrides = {"width": 16, "layers": 1, "heads": 2}
c.model.embed_dim = 8
c.model.ssl_head = dict(hidden=16, out=8, norm="layer")
c.train.update(
    batch_size=8, total_steps=2, ckpt_every=1000, log_every=1, progress=False, num_devices=1
)
c.evals = {}
shutil.rmtree(out, ignore_errors=True)
wd = os.path.join(out, "workdir")
os.makedirs(wd)
with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(c.to_dict(), f, indent=2, default=str)
t = Trainer(c, wd)
t.run()
exp = export_checkpoint(wd, os.path.join(out, "export"), stablehlo=False)
m = load_pretrained(exp)
rng = np.random.default_rng(0)
images = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
texts = ["a grinning face", "a red apple", "", "an emoji of a cat"]
np.savez(
    os.path.join(out, "expected.npz"),
    images=images,
    image_emb=m.encode_images(images),
    text_emb=m.encode_texts(texts),
)
json.dump(texts, open(os.path.join(out, "texts.json"), "w"))
print("ok", sorted(os.listdir(out)))
