"""mmssl_jax/checksums.py: manifests of sha256 per file, written and verified."""

import ast
import json
import os

import pytest

from mmssl_jax import checksums


def _tree(root) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "b.txt").write_text("hello")
    (root / "sub" / "deeper" / "empty").write_bytes(b"")


def test_manifest_round_trip_flip_missing_and_extra(tmp_path):
    root = tmp_path / "data"
    _tree(root)
    manifest = checksums.write_manifest(str(root), str(tmp_path / "m.json"))
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.txt", "sub/deeper/empty"]
    assert manifest["files"]["sub/b.txt"] == {
        "size": 5,
        "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
    }
    assert checksums.verify_manifest(str(root), str(tmp_path / "m.json")) == []

    data = bytearray((root / "a.bin").read_bytes())
    data[5000] ^= 0x01  # one bit of one byte: same size, other sha256
    (root / "a.bin").write_bytes(bytes(data))
    (root / "sub" / "b.txt").unlink()
    (root / "unlisted.txt").write_text("added later")  # not in the manifest: not checked
    assert checksums.verify_manifest(str(root), str(tmp_path / "m.json")) == ["a.bin", "sub/b.txt"]


def test_manifest_inside_its_directory_does_not_list_itself(tmp_path):
    _tree(tmp_path)
    path = str(tmp_path / "CHECKSUMS.json")
    checksums.write_manifest(str(tmp_path), path)
    assert "CHECKSUMS.json" not in checksums.read_manifest(path)["files"]
    assert checksums.verify_manifest(str(tmp_path), path) == []
    checksums.write_manifest(str(tmp_path), path)  # rewriting it is stable
    assert checksums.verify_manifest(str(tmp_path), path) == []
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"files": ')
    with pytest.raises(checksums.ManifestError, match=r"m.json: cannot read the checksum"):
        checksums.verify_manifest(str(tmp_path), str(path))
    path.write_text(json.dumps({"files": {"a": "x"}}))
    with pytest.raises(checksums.ManifestError, match="not a checksum manifest"):
        checksums.read_manifest(str(path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        checksums.write_manifest(str(tmp_path / "nope"), str(path))


def test_module_imports_nothing_from_mmssl_jax():
    """The export format reuses it, so it must stand alone."""
    tree = ast.parse(open(checksums.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "mmssl_jax"], names
