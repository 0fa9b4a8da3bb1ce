"""Config checks that turn typos and impossible settings into errors a person can act on."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of a nested ConfigDict ('train.batch_size', ...)."""
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, dotted + "."))
    return keys


def override_keys(argv: Sequence[str], flag: str = "config") -> list[str]:
    """Dotted keys of `--config.a.b=v` / `--config.a.b v` overrides in argv."""
    prefix = f"--{flag}."
    return [arg[len(prefix) :].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def check_keys(keys: Iterable[str], config: ml_collections.ConfigDict) -> None:
    """Raises KeyError for an unknown key, listing the nearest valid ones."""
    valid = flat_keys(config)
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise KeyError(f"unknown config key {key!r}.{hint}")


def import_extensions(extensions: Iterable[str]) -> list[Any]:
    """Imports a config's `extensions`: dotted module names or paths of .py files that
    register a user's own objective terms, model outputs, heads or evaluators. Importing
    twice is a no-op (the module is cached by its path), so every process that reads the
    config (training, `--mode=eval`, export) registers the same things."""
    modules = []
    for entry in extensions or ():
        entry = str(entry)
        if entry.endswith(".py"):
            path = os.path.abspath(entry)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config.extensions: {entry} does not exist")
            name = "mmssl_ext_" + hashlib.sha1(path.encode()).hexdigest()[:12]
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            modules.append(sys.modules[name])
        else:
            modules.append(importlib.import_module(entry))
    return modules
