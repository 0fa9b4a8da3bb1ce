"""A tiny CLIP with the pretrained all-MiniLM-L6-v2 text tower locked (LiT's "U L") learns
on the real embedded emoji: held-out retrieval far above the same run at random init; its
export carries the WordPiece tokenizer.json and encodes captions as the trained model does."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from configs.tiny_clip import get_config  # noqa: E402
from mmssl_jax import load_pretrained  # noqa: E402
from mmssl_jax.evaluation import hook  # noqa: E402
from mmssl_jax.evaluation.model_encoder import ModelEncoder  # noqa: E402
from mmssl_jax.export import export_checkpoint  # noqa: E402
from mmssl_jax.models import bert  # noqa: E402
from mmssl_jax.training.trainer import Trainer  # noqa: E402

try:
    bert.find_bert_dir("all-minilm-l6-v2")
except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:  # not installed
    pytest.skip(f"all-MiniLM-L6-v2 is not installed: {e}", allow_module_level=True)


def _config(data):
    config = get_config(f"data={data},text=bert,text_lock=true")
    config.model.context_length = 16  # emoji captions are short; BERT's cost is per token
    config.data.text_length = 16
    config.train.update(batch_size=32, total_steps=80, log_every=20, progress=False)
    config.optim.warmup_steps = 5
    retrieval = dict(config.evals.emoji_retrieval)
    retrieval.update(limit=256, baselines=True, plots=False, raw_pixel_size=8)
    config.evals = {"emoji_retrieval": retrieval}
    return config


def test_locked_bert_tower_learns_and_exports(embedded_data, tmp_path):
    config = _config(embedded_data)
    workdir = tmp_path / "run"
    trainer = Trainer(config, str(workdir))
    assert trainer.model_cfg.text_encoder == "bert" and trainer.model_cfg.vocab_size == 30522
    assert trainer.model_cfg.text_overrides.layers == 6 and trainer.model_cfg.context_length == 16
    trainer.run()
    evaluate = hook.make_evaluate(
        config, str(workdir), trainer.model, trainer.model_cfg, tokenizer=trainer.tokenizer
    )
    metrics = evaluate(trainer.state, 80)
    report = json.load(open(workdir / "eval" / "latest.json"))
    random_init = report["baselines"]["random_init"]["emoji_retrieval/img2txt_R@10"]
    trained = metrics["emoji_retrieval/img2txt_R@10"]
    chance = 10 / 256
    assert trained > max(2.5 * random_init, 2.5 * chance), (trained, random_init)

    export = export_checkpoint(
        str(workdir), str(tmp_path / "export"), config=config, stablehlo=False
    )
    manifest = json.load(open(tmp_path / "export" / "manifest.json"))
    assert "tokenizer.json" in manifest["files"] and manifest["files"]["tokenizer.json"]["sha256"]
    model = load_pretrained(export)
    texts = ["grinning face", "red apple", "a cat"]
    encoder = ModelEncoder(
        trainer.model,
        {"params": trainer.state.params},
        trainer.tokenizer,
        text_length=trainer.model_cfg.context_length,
    )
    np.testing.assert_allclose(model.encode_texts(texts), encoder.text_embeddings(texts), atol=1e-5)
