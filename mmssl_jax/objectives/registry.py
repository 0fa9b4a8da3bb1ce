"""Objective terms by name, and their weighted sum under one `jax.shard_map`.

A config lists terms with weights (and optional options):

    config.objectives = [("clip", 1.0), ("simclr", 1.0, {"temperature": 0.1})]   # SLIP

Each term reads the model outputs it `needs` (declared in objectives/outputs.py: image_emb,
text_emb, logit_scale (exponentiated), logit_bias, ssl_a, ssl_b, label, index, ...) and
returns (loss, metrics). `needed_inputs` tells the step what to compute at all, `batch_keys`
what the pipeline must deliver, and `model_parts` which towers and heads the config builds.
A term lives in its own file with its loss function and its registration.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmssl_jax.objectives import outputs as outputs_lib

Metrics = dict[str, jax.Array]
TermFn = Callable[[Mapping[str, jax.Array], str | None], tuple[jax.Array, Metrics]]
TermSpec = str | tuple[str, float] | tuple[str, float, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Term:
    """A named loss term: `fn(outputs, axis_name) -> (loss, metrics)` over `needs` keys."""

    name: str
    needs: frozenset[str]
    fn: TermFn
    # Optional `needs_fn(**options) -> set of keys`, for terms whose inputs depend on their
    # options (e.g. which views GDT compares); `get_term(name, **options)` then uses it.
    needs_fn: Callable[..., Iterable[str]] | None = None


_TERMS: dict[str, Term] = {}


def register_term(
    name: str,
    needs: Iterable[str],
    needs_fn: Callable[..., Iterable[str]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering `fn(outputs, axis_name, **options)` as term `name`.

    `needs` are the output keys it reads with default options; `needs_fn(**options)`, when
    given, returns them for a term bound with options (see `get_term`).
    """

    def decorate(fn: Callable) -> Callable:
        for key in needs:
            outputs_lib.output(key)  # an unknown output is an error here, not at step time
        if name in _TERMS:
            raise ValueError(f"objective term {name!r} is already registered")
        _TERMS[name] = Term(name, frozenset(needs), fn, needs_fn)
        return fn

    return decorate


def term_names() -> list[str]:
    """The registered term names, sorted."""
    return sorted(_TERMS)


def get_term(name: str, **options: Any) -> Term:
    """The term `name`, with keyword `options` (e.g. temperature, chunk_size) bound to fn."""
    if name not in _TERMS:
        raise ValueError(f"unknown objective term {name!r}; valid terms: {term_names()}")
    term = _TERMS[name]
    if not options:
        return term
    params = inspect.signature(term.fn).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"term {name!r} has no option(s) {unknown}; its options: {allowed}")
    needs = term.needs if term.needs_fn is None else frozenset(term.needs_fn(**options))
    return dataclasses.replace(term, needs=needs, fn=functools.partial(term.fn, **options))


def _parse(terms: Sequence[TermSpec]) -> list[tuple[str, float, dict[str, Any]]]:
    """Normalises term specs to (name, weight, options); a bare name has weight 1."""
    out = []
    for spec in terms:
        if isinstance(spec, str):
            spec = (spec, 1.0)
        if not 2 <= len(spec) <= 3:
            raise ValueError(f"a term is (name, weight) or (name, weight, options), got {spec!r}")
        name, weight = spec[0], float(spec[1])
        out.append((name, weight, dict(spec[2]) if len(spec) == 3 else {}))
    names = [name for name, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"each term may appear once (metrics are keyed by name): {names}")
    return out


def needed_inputs(terms: Sequence[TermSpec]) -> set[str]:
    """The output keys the given terms read (so the pipeline/model compute only those);
    a (name, weight, options) spec counts the options (see `Term.needs_fn`)."""
    return set().union(*(get_term(name, **opts).needs for name, _, opts in _parse(terms)))


def total_loss(
    terms: Sequence[TermSpec],
    outputs: Mapping[str, jax.Array],
    mesh: Mesh | None,
    axis: str = "data",
) -> tuple[jax.Array, Metrics]:
    """Weighted sum of the terms on the global batch; metrics "<term>/<key>" and "loss".

    With a mesh, all terms run inside one `jax.shard_map` over `axis` (batch-shaped arrays
    P(axis), scalars P(), outputs replicated), each device holding [n, N] logit blocks;
    loss, metrics and gradients equal the mesh=None result on the same global batch.
    """
    specs = _parse(terms)
    bound = [(get_term(name, **opts), weight) for name, weight, opts in specs]
    keys = sorted(set().union(*(t.needs for t, _ in bound)))
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise ValueError(f"terms {[s[0] for s in specs]} need outputs {missing}")
    inputs = {k: jnp.asarray(outputs[k]) for k in keys}

    def local(inputs: dict[str, jax.Array], axis_name: str | None):
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for term, weight in bound:
            loss, term_metrics = term.fn(inputs, axis_name)
            total = total + weight * loss
            metrics.update({f"{term.name}/{k}": v for k, v in term_metrics.items()})
            metrics[f"{term.name}/loss"] = loss
        metrics["loss"] = total
        if axis_name is not None:
            metrics = jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), metrics)
        return metrics["loss"], metrics

    if mesh is None:
        return local(inputs, None)
    size = mesh.shape[axis]
    for k, v in inputs.items():
        if v.ndim and v.shape[0] % size:
            raise ValueError(
                f"output {k!r} has batch {v.shape[0]}, not divisible by the {size} devices "
                f"of mesh axis {axis!r}"
            )
    in_specs = {k: jax.P() if v.ndim == 0 else jax.P(axis) for k, v in inputs.items()}
    sharded = jax.shard_map(
        functools.partial(local, axis_name=axis),
        mesh=mesh,
        in_specs=(in_specs,),
        out_specs=jax.P(),
    )
    return sharded(inputs)


def batch_keys(terms: Sequence[TermSpec]) -> set[str]:
    """The batch arrays the pipeline must produce for these terms."""
    return outputs_lib.batch_keys(needed_inputs(terms))


def model_parts(terms: Sequence[TermSpec]) -> set[str]:
    """The model parts (text_encoder, ssl_head, extra heads) these terms need."""
    return outputs_lib.model_parts(needed_inputs(terms))
