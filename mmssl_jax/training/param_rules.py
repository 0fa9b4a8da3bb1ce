"""Per-parameter training controls as config rules, big_vision style.

Every control is a list of `(regex, value)` pairs over the '/'-joined parameter path (the
path inside `params`, e.g. `image_encoder/blocks_3/attn/qkv/kernel`). A regex must match the
whole path (`re.fullmatch`) and the FIRST matching rule decides, so specific rules go before
general ones. The keys, all in `config.optim`:

    freeze      [(regex, bool)]  True: the parameter is frozen (no update, no optimizer
                                 state); unmatched parameters train. A plain string means
                                 (string, True).
    lr_mults    [(regex, float)] learning-rate multiplier; unmatched parameters get 1.
    layer_decay float            layer-wise lr decay for the ViT and text blocks (0 or 1:
                                 off): block i of a depth-L tower gets decay**(L - i), the
                                 embeddings decay**(L + 1), the final norm 1. It multiplies
                                 `lr_mults`, and is shown as generated rules in the table.
    wd_mults    [(regex, float)] weight-decay multiplier (times `weight_decay`); unmatched
                                 parameters are NOT decayed. The default, `SLIP_WD_RULES`,
                                 is SLIP's "decay iff ndim >= 2" written as name rules.

LiT ("locked image tuning"): `lock_tower("image_encoder", unlocked_last=k, depth=L)` gives
the freeze rules that lock a tower except its last k blocks and final norm.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mmssl_jax.pytree import flat_items, path_of  # noqa: F401  (path_of: re-exported)

Rule = tuple[str, Any]

# SLIP's rule (decay matrices and embeddings, not biases, norm scales or the logit
# scale/bias) as name rules. tests/training/test_param_rules.py checks it equals `ndim >= 2`
# on every model in the registry.
SLIP_WD_RULES: tuple[Rule, ...] = (
    (r"(.*/)?(bias|scale)", 0.0),
    (r"logit_(scale|bias)", 0.0),
    (r".*", 1.0),
)

# Where each transformer tower keeps its blocks (a regex, "{}" the block index), and which
# of its parameters sit below the first block (embeddings: layer 0) or above the last (final
# norm: layer L + 1). The text tower is CLIP's transformer (resblocks_i) or BERT (blocks_i).
TOWERS: dict[str, dict[str, str]] = {
    "image_encoder": dict(block="blocks_{}", embed="patch_embed|cls_token|pos_embed|reg_tokens"),
    "text_encoder": dict(
        block="(?:res)?blocks_{}", embed="token_embedding|positional_embedding|embeddings"
    ),
}


def flat_params(params: Any) -> list[tuple[str, Any]]:
    """[(path, leaf)] in tree order."""
    return flat_items(params)


def normalize_rules(rules: Any, default_value: Any = True) -> list[Rule]:
    """A list of (regex, value); a bare string is (string, default_value). Compiles each
    regex once to report a bad one with its index."""
    out: list[Rule] = []
    for i, rule in enumerate(rules or ()):
        if isinstance(rule, str):
            pattern, value = rule, default_value
        elif isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str):
            pattern, value = rule[0], rule[1]
        else:
            raise ValueError(f"rule {i} ({rule!r}) must be (regex, value) or a regex string")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule {i}: bad regex {pattern!r} ({e})") from None
        out.append((pattern, value))
    return out


def first_match(rules: Sequence[Rule], path: str) -> int | None:
    """Index of the first rule whose regex matches the whole path, or None."""
    for i, (pattern, _) in enumerate(rules):
        if re.fullmatch(pattern, path):
            return i
    return None


def tower_depths(paths: Sequence[str]) -> dict[str, int]:
    """Blocks per tower found in the parameter paths (towers without blocks are left out)."""
    depths: dict[str, int] = {}
    for tower, spec in TOWERS.items():
        block = spec["block"].replace("{}", r"(\d+)")
        pat = re.compile(re.escape(tower) + "/" + block + "/")
        found = [int(m.group(1)) for p in paths if (m := pat.match(p))]
        if found:
            depths[tower] = max(found) + 1
    return depths


def layer_decay_rules(paths: Sequence[str], decay: float) -> list[Rule]:
    """Layer-wise lr decay as lr-multiplier rules (BEiT/MAE convention) for every tower
    with blocks: embeddings decay**(L+1), block i decay**(L-i); the rest of the tower
    (final norm) and everything outside the towers keep 1."""
    if not decay or decay == 1.0:
        return []
    rules: list[Rule] = []
    for tower, depth in tower_depths(paths).items():
        spec = TOWERS[tower]
        rules.append((f"{tower}/({spec['embed']})(/.*)?", float(decay ** (depth + 1))))
        for i in range(depth):
            rules.append((f"{tower}/{spec['block'].format(i)}/.*", float(decay ** (depth - i))))
    return rules


def lock_tower(
    tower: str, *, depth: int | None = None, unlocked_last: int = 0, unlock_norm: bool = True
) -> list[Rule]:
    """Freeze rules that lock `tower` (LiT), leaving its last `unlocked_last` blocks (and,
    with them, its final norm) trainable. `depth` is needed when `unlocked_last > 0`."""
    rules: list[Rule] = []
    if unlocked_last > 0:
        if depth is None or unlocked_last > depth:
            raise ValueError(f"lock_tower({tower!r}): unlocked_last={unlocked_last} needs depth")
        block = TOWERS[tower]["block"]
        ids = "|".join(str(i) for i in range(depth - unlocked_last, depth))
        rules.append((f"{tower}/{block.format('(' + ids + ')')}/.*", False))
        if unlock_norm:
            rules.append((f"{tower}/(norm|ln_final)/.*", False))
    rules.append((f"{tower}/.*", True))
    return rules


@dataclasses.dataclass(frozen=True)
class ParamSetting:
    """What the rules decided for one parameter, and which rule decided (index or None)."""

    path: str
    shape: tuple[int, ...]
    frozen: bool
    lr_mult: float
    wd_mult: float
    freeze_rule: int | None
    lr_rule: int | None
    layer_rule: int | None
    wd_rule: int | None


@dataclasses.dataclass(frozen=True)
class Rules:
    """The normalised rule lists of an optimizer config."""

    freeze: list[Rule]
    lr_mults: list[Rule]
    layer_decay: float
    wd_mults: list[Rule]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Rules:
        wd = cfg.get("wd_mults", None)
        return cls(
            freeze=normalize_rules(cfg.get("freeze", None), True),
            lr_mults=normalize_rules(cfg.get("lr_mults", None), 1.0),
            layer_decay=float(cfg.get("layer_decay", 0.0) or 0.0),
            wd_mults=normalize_rules(SLIP_WD_RULES if wd is None else wd, 1.0),
        )

    def settings(self, params: Any) -> list[ParamSetting]:
        """The decision for every parameter, in tree order."""
        flat = flat_params(params)
        layer = layer_decay_rules([p for p, _ in flat], self.layer_decay)
        out = []
        for path, leaf in flat:
            fi, li, di, wi = (
                first_match(self.freeze, path),
                first_match(self.lr_mults, path),
                first_match(layer, path),
                first_match(self.wd_mults, path),
            )
            lr = float(self.lr_mults[li][1]) if li is not None else 1.0
            lr *= float(layer[di][1]) if di is not None else 1.0
            out.append(
                ParamSetting(
                    path=path,
                    shape=tuple(np.shape(leaf)),
                    frozen=bool(self.freeze[fi][1]) if fi is not None else False,
                    lr_mult=lr,
                    wd_mult=float(self.wd_mults[wi][1]) if wi is not None else 0.0,
                    freeze_rule=fi,
                    lr_rule=li,
                    layer_rule=di,
                    wd_rule=wi,
                )
            )
        return out

    def any_frozen(self) -> bool:
        return any(bool(v) for _, v in self.freeze)


def _map_paths(fn: Any, tree: Any) -> Any:
    """tree.map over leaves with their '/'-joined path (MaskedNode leaves are skipped)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_of(p), x), tree)


def value_tree(rules: Sequence[Rule], tree: Any, default: Any) -> Any:
    """A tree of the first matching rule's value per leaf (or `default`)."""

    def pick(path: str, _: Any) -> Any:
        i = first_match(rules, path)
        return rules[i][1] if i is not None else default

    return _map_paths(pick, tree)


def labels_fn(rules: Rules) -> Any:
    """params -> tree of "frozen"/"train" labels (for optax.multi_transform)."""
    return lambda tree: _map_paths(
        lambda path, _: (
            "frozen"
            if (i := first_match(rules.freeze, path)) is not None and rules.freeze[i][1]
            else "train"
        ),
        tree,
    )


def frozen_params(cfg: Mapping[str, Any]) -> Any:
    """params -> tree of bools (True: frozen by `cfg.freeze`), or None when nothing is
    frozen; the train step stops gradients there (training/step.without_frozen_grads)."""
    rules = Rules.from_config(cfg)
    if not rules.any_frozen():
        return None
    labels = labels_fn(rules)
    return lambda tree: jax.tree.map(lambda label: label == "frozen", labels(tree))


def lr_mult_fn(rules: Rules) -> Any:
    """params -> tree of python-float lr multipliers (lr_mults x layer decay)."""

    def fn(tree: Any) -> Any:
        layer = layer_decay_rules([p for p, _ in flat_params(tree)], rules.layer_decay)

        def mult(path: str, _: Any) -> float:
            li, di = first_match(rules.lr_mults, path), first_match(layer, path)
            m = float(rules.lr_mults[li][1]) if li is not None else 1.0
            return m * (float(layer[di][1]) if di is not None else 1.0)

        return _map_paths(mult, tree)

    return fn


def wd_mult_fn(rules: Rules) -> Any:
    """params -> tree of python-float weight-decay multipliers (unmatched: 0)."""
    return lambda tree: jax.tree.map(float, value_tree(rules.wd_mults, tree, 0.0))


# ----------------------------------------------------------------------------- the table


def _fmt(value: float) -> str:
    return f"{value:g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def rules_table(cfg: Mapping[str, Any], params: Any, *, per_parameter: bool = True) -> str:
    """The rules of `config.optim` against `params` (arrays or ShapeDtypeStructs), as text:

    1. every rule with the parameters (count, elements) it decides, flagging rules that
       decide nothing (a typo, or shadowed by an earlier rule);
    2. totals: trainable vs frozen parameters, and the global-norm clip;
    3. with `per_parameter`, one line per parameter: shape, train/frozen, lr and wd mult.
    """
    rules = Rules.from_config(cfg)
    settings = rules.settings(params)
    layer = layer_decay_rules([s.path for s in settings], rules.layer_decay)
    numel = {s.path: math.prod(s.shape) for s in settings}

    rows = []
    kinds = (
        ("freeze", rules.freeze, "freeze_rule"),
        ("lr_mult", rules.lr_mults, "lr_rule"),
        ("layer_decay", layer, "layer_rule"),
        ("wd_mult", rules.wd_mults, "wd_rule"),
    )
    for kind, rule_list, attr in kinds:
        for i, (pattern, value) in enumerate(rule_list):
            hit = [s.path for s in settings if getattr(s, attr) == i]
            shown = ("frozen" if value else "train") if kind == "freeze" else _fmt(float(value))
            note = "" if hit else "<- decides no parameter"
            rows.append(
                [kind, str(i), pattern, shown, str(len(hit)), f"{sum(numel[p] for p in hit):,}"]
                + [note]
            )
    lines = ["parameter rules (first matching regex decides; regex must match the whole path)"]
    if rows:
        lines += _grid(["kind", "#", "regex", "value", "params", "elements", "note"], rows)
    else:
        lines.append("(no rules)")
    frozen = [s for s in settings if s.frozen]
    n_frozen = sum(numel[s.path] for s in frozen)
    n_all = sum(numel.values())
    clip = float(cfg.get("grad_clip_norm", 0.0) or 0.0)
    lines.append(
        f"trainable: {len(settings) - len(frozen)} params, {n_all - n_frozen:,} elements; "
        f"frozen: {len(frozen)} params, {n_frozen:,} elements (no optimizer state); "
        f"layer_decay: {_fmt(rules.layer_decay) if layer else 'off'}; "
        f"grad_clip_norm: {_fmt(clip) if clip else 'off'}"
    )
    if per_parameter:
        lines.append("")
        lines += _grid(
            ["parameter", "shape", "state", "lr_mult", "wd_mult"],
            [
                [
                    s.path,
                    "x".join(map(str, s.shape)) or "scalar",
                    "frozen" if s.frozen else "train",
                    "-" if s.frozen else _fmt(s.lr_mult),
                    "-" if s.frozen else _fmt(s.wd_mult),
                ]
                for s in settings
            ],
        )
    return "\n".join(lines)
