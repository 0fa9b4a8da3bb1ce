"""notebooks/colab_tpu.ipynb runs top to bottom on the CPU (nbclient + ipykernel)."""

import pytest

from tests.conftest import ROOT

nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="ipykernel missing: pip install -e '.[dev]'")

NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"


def test_notebook_runs_on_cpu(embedded_data, tmp_path, monkeypatch):
    # The kernel inherits this environment: the session's data (already built, so the shard
    # cell finds it up to date), a scratch workdir, and one plain CPU device as on a laptop.
    monkeypatch.setenv("MMSSL_NOTEBOOK_DATA", str(embedded_data))
    monkeypatch.setenv("MMSSL_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback

    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
    )
    assert "backend: cpu" in outputs
    assert "emoji_zero_shot/top1" in outputs
    assert "zero-shot top-1 on 64 test emoji" in outputs
    assert "max |diff| vs load_pretrained" in outputs
    for name in ("manifest.json", "params.safetensors", "encode_images.jax", "tokenizer.model"):
        assert (tmp_path / "export" / name).is_file()
    # The loss was logged and finite.
    assert "'loss':" in outputs and "nan" not in outputs.split("'loss':")[1][:20]
