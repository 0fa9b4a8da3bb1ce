"""Issue 9, item 7: nothing on a loading path unpickles. Checkpoints (train state and data
iterator), exports, topic models, tokenizers and init-from weights are read as data; a file
from elsewhere can never run code through them.

Two checks, each able to fail on its own:
- statically, no module of the package or its tools imports a pickle-family library or asks
  numpy/torch/pandas to unpickle;
- dynamically, every loading path runs under a guard that fails on any unpickling: Python's
  `pickle.find_class` audit event (raised by every unpickler that resolves a global, which any
  pickled object or array needs) plus the `pickle` entry points themselves.
"""

from __future__ import annotations

import ast
import contextlib
import pickle
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from input_pipeline.sources import topics
from input_pipeline.tokenizers.spm import Tokenizer
from mmssl_jax import export
from mmssl_jax.training import init_from
from mmssl_jax.training.checkpoint import Checkpointer
from mmssl_jax.training.trainer import Trainer
from tests.faults import fault_config

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mmssl_jax", "input_pipeline", "tools", "configs")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
# Importing foreign PyTorch weights (tools/convert_torch.py) reads .pt files with torch's
# restricted unpickler, which only rebuilds tensors and plain containers; that is the one
# allowed use, and only with weights_only=True spelled out.
ALLOWED_TORCH_LOAD = "weights_only"
SAVED_STEP = 7


def _pickle_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and not allow.value):
                found.append(f"{name}(allow_pickle=...)")
            if name.endswith("read_pickle") or name.endswith(".load_pickle"):
                found.append(name)
            if name == "torch.load":
                weights_only = keywords.get(ALLOWED_TORCH_LOAD)
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append("torch.load without weights_only=True")
    return found


def _parse(path: Path) -> ast.Module:
    """ast.parse, once more on CPython 3.11's "AST constructor recursion depth mismatch"
    SystemError (a process-wide counter that another thread compiling an import can move,
    a CPython 3.11 bug): a property of the interpreter, not of the file."""
    source = path.read_text()
    try:
        return ast.parse(source, filename=str(path))
    except SystemError as e:
        if "recursion depth mismatch" not in str(e):
            raise
        return ast.parse(source, filename=str(path))


def test_no_module_imports_pickle_or_unpickles():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    offenders = {}
    for path in files:
        uses = _pickle_uses(_parse(path))
        if uses:
            offenders[str(path.relative_to(ROOT))] = uses
    assert not offenders, f"pickle on a loading path: {offenders}"
    # The scanner itself finds what it is looking for.
    bad = "import pickle\nnp.load(f, allow_pickle=True)\ntorch.load(p)\n"
    assert len(_pickle_uses(ast.parse(bad))) == 3


class UnpicklingError(AssertionError):
    """Something was unpickled inside `no_unpickling()`."""


_guard = {"on": False}


def _audit(event: str, args: tuple) -> None:
    if _guard["on"] and event == "pickle.find_class":
        raise UnpicklingError(f"unpickling looked up {args[0]}.{args[1]}")


sys.addaudithook(_audit)  # hooks cannot be removed; this one acts only inside the guard


@contextlib.contextmanager
def no_unpickling(monkeypatch):
    """Fails the test on any unpickling in the block."""

    def refuse(*args, **kwargs):
        raise UnpicklingError("pickle entry point called")

    with monkeypatch.context() as m:
        for name in ("load", "loads", "Unpickler"):
            m.setattr(pickle, name, refuse)
        _guard["on"] = True
        try:
            yield
        finally:
            _guard["on"] = False


def test_guard_catches_unpickling(monkeypatch):
    data = pickle.dumps(np.zeros(3))
    import _pickle

    with no_unpickling(monkeypatch), pytest.raises(UnpicklingError):
        _pickle.loads(data)  # the C entry point, bypassing the patched module attributes
    with no_unpickling(monkeypatch), pytest.raises(UnpicklingError):
        pickle.loads(data)
    assert pickle.loads(data).shape == (3,)  # outside the guard, nothing is refused


@pytest.fixture(scope="module")
def artifacts(embedded_data, tmp_path_factory):
    """A checkpoint (state + data iterator), an export, a topic model and a tokenizer."""
    root = tmp_path_factory.mktemp("artifacts")
    config = fault_config.get_config(f"data={embedded_data}")
    trainer = Trainer(config, str(root / "run"))
    state = trainer._init(config.seed)
    state = state.replace(step=state.step + SAVED_STEP)  # tells a restore from a fresh init
    ckpt = Checkpointer(str(root / "run"))
    ckpt.save(SAVED_STEP, state, trainer.data_iter, force=True)
    ckpt.close()
    exported = export.write_export(
        str(root / "export"),
        model_cfg=trainer.model_cfg.to_dict(),
        variables={"params": jax.device_get(state.params)},
        preprocess=export.preprocess_spec(config.data.image_size),
        text_length=config.data.text_length,
        tokenizer_proto=Tokenizer(config.data.tokenizer).model_proto,
        stablehlo=False,
    )
    docs = [f"a photo of a {w} {v}" for w in ("cat", "dog", "car") for v in ("red", "blue")]
    model = topics.fit_text_model(docs * 3, "lsa", dim=2, min_df=1, max_df=1.0, max_iter=2)
    model.save(str(root / "topics"))
    return {
        "config": config,
        "run": root / "run",
        "export": exported,
        "topics": root / "topics",
        "docs": docs,
        "expected_topics": model.transform(docs),
        "params": jax.device_get(state.params),
    }


def test_loading_paths_never_unpickle(artifacts, monkeypatch):
    config = artifacts["config"]
    with no_unpickling(monkeypatch):
        # Resuming: the train state and the grain iterator state.
        trainer = Trainer(config, str(artifacts["run"]))
        ckpt = Checkpointer(str(artifacts["run"]))
        state = trainer.initial_state(ckpt)
        ckpt.close()
        # Exports (safetensors + JSON + the tokenizer proto) and fine-tuning from them.
        model = export.load_pretrained(artifacts["export"])
        from_export = init_from.load_init_params(artifacts["export"], trainer.state_shape.params)
        from_ckpt = init_from.load_init_params(str(artifacts["run"]), trainer.state_shape.params)
        # Topic models and tokenizers.
        text_model = topics.TextModel.load(str(artifacts["topics"]))
        tokenizer = Tokenizer(config.data.tokenizer)
    # What was loaded is what was saved.
    assert int(state.step) == SAVED_STEP
    for loaded in (state.params, from_export, from_ckpt, model.variables["params"]):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), artifacts["params"])
    np.testing.assert_array_equal(
        text_model.transform(artifacts["docs"]), artifacts["expected_topics"]
    )
    assert tokenizer.vocab_size > 0 and model.tokenizer is not None
