"""Fine-tune the tiny CLIP on Fashion-MNIST class prompts; the CPU demo of the fine-tuning
recipe (configs/finetune_vitb.py) and of WiSE-FT.

    python -m mmssl_jax.main --config=configs/tiny_clip.py --workdir=W/clip      # pretrain
    python -m mmssl_jax.main --config=configs/finetune_tiny.py:init=W/clip --workdir=W/ft
    python tools/wise_ft.py --config=configs/finetune_tiny.py:init=W/clip \\
        --workdir=W/ft --output=W/wise_0.5 --alpha=0.5
    python -m mmssl_jax.main --config=configs/finetune_tiny.py:init=W/clip \\
        --workdir=W/wise_0.5 --mode=eval

Evaluations: the fine-tune task (zero-shot accuracy on Fashion-MNIST test, CLIP's 80
prompts) and the zero-shot task the pretraining learned (held-out emoji, emoji names).
"""

from configs.common import DATA_ROOT, embedded_evals
from configs.finetune_vitb import finetune_recipe


def get_config(arg=None):
    root = DATA_ROOT
    for item in (arg or "").split(","):  # the data root decides the defaults below
        if item.startswith("data="):
            root = item.partition("=")[2]
    config = finetune_recipe(
        "tiny",
        arg,
        data=root,
        train=f"{root}/fashion_mnist/fashion_mnist-train-*.tfrecord",
        test=f"{root}/fashion_mnist/fashion_mnist-test-*.tfrecord",
        classnames=f"{root}/fashion_mnist/fashion_mnist-classnames.json",
        lr=1e-4,
        batch=256,
        epochs=1.0,
        warmup=20,
    )
    config.evals.task_zero_shot.limit = 2000
    config.evals.emoji_zero_shot = embedded_evals(root, config.data.image_size)["emoji_zero_shot"]
    config.evals.emoji_zero_shot.baselines = False
    config.evals.emoji_zero_shot.tsne = False
    return config
