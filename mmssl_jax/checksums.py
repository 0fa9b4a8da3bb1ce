"""Checksum manifests: the sha256 and size of every file under a directory, written as JSON
and verified later, so that a byte changed on disk (a bad sector, a partial copy, a stray
write) is found before the data is used instead of loading silently.

Generic on purpose (nothing from the rest of mmssl_jax is imported): training checkpoints use
it, and the export format can reuse it as it is.

Manifest layout (JSON, keys sorted, paths relative to the directory with "/" separators):

    {"format": "mmssl_jax.checksums", "version": 1, "algorithm": "sha256",
     "files": {"state/manifest.ocdbt": {"size": 1234, "sha256": "ab12..."}, ...}}

A manifest may live inside the directory it covers; it does not list itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

FORMAT = "mmssl_jax.checksums"
VERSION = 1
ALGORITHM = "sha256"


class ManifestError(ValueError):
    """A manifest that cannot be read or is not one (names the file and the problem)."""


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, as hex; read in chunks (constant memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def _files(directory: str, exclude: str | None) -> list[str]:
    """Relative paths ("/"-separated, sorted) of the regular files under `directory`."""
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in names:
            full = os.path.join(root, name)
            if exclude is not None and os.path.abspath(full) == exclude:
                continue
            out.append(os.path.relpath(full, directory).replace(os.sep, "/"))
    return sorted(out)


def write_manifest(directory: str, path: str) -> dict[str, Any]:
    """Hashes every file under `directory` and writes the manifest to `path` (atomically:
    a temporary file renamed into place, so a crash never leaves half a manifest).
    Returns the manifest."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory, nothing to checksum")
    files = {
        rel: {
            "size": os.path.getsize(os.path.join(directory, rel)),
            ALGORITHM: file_sha256(os.path.join(directory, rel)),
        }
        for rel in _files(directory, exclude=os.path.abspath(path))
    }
    manifest = {"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM, "files": files}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest at `path`; ManifestError when it is unreadable or not a manifest."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the checksum manifest ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("algorithm") != ALGORITHM
        or not all(isinstance(v, dict) and ALGORITHM in v and "size" in v for v in files.values())
    ):
        raise ManifestError(
            f"{path}: not a checksum manifest (expected format {FORMAT!r}, "
            f"algorithm {ALGORITHM!r} and a 'files' table of size and {ALGORITHM})"
        )
    return manifest


def verify_manifest(directory: str, path: str) -> list[str]:
    """The files of `directory` that do not match the manifest at `path`: listed but missing,
    or with another size or sha256. Relative paths, sorted; [] when everything matches.

    Files the manifest does not list are not checked. Raises ManifestError when the manifest
    itself cannot be read.
    """
    bad = []
    for rel, entry in sorted(read_manifest(path)["files"].items()):
        full = os.path.join(directory, *rel.split("/"))
        try:
            if os.path.getsize(full) != entry["size"] or file_sha256(full) != entry[ALGORITHM]:
                bad.append(rel)
        except OSError:  # missing or unreadable
            bad.append(rel)
    return bad
