"""Every setting's domain, on top of its type: the closed choices, the registered names, the
rules a config must satisfy (a value that type-checks but makes no sense names its key and the
rule), and the settings the chosen parts ignore. ``loading.load_config`` applies :func:`validate`."""

from __future__ import annotations

import math
import re
from typing import Any

from moco_engine.config.registry import OWNERS, covers, params_of, reads, registry
from moco_engine.config.schema import Config, ConfigError, setting, valid_keys

# Values a key may take, where the set is closed. Checked after merging, so the error names the key.
# The settings users extend take the names of their registries (config.registry.OWNERS).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.pipeline": ("auto", "cpu", "device"),
    "data.on_bad_image": ("fail", "skip"),
    "data.decode": ("cpu", "gpu"),
    "model.momentum_schedule": ("constant", "cosine"),
    "model.bn": ("shuffle", "sync", "plain"),
    "model.norm": ("batch", "group"),
    "model.bn_split_form": ("auto", "per_slice", "one_pass", "strided", "grouped"),
    "queue.mask_same_instance": ("auto", "true", "false"),
    "queue.dtype": ("float32", "bfloat16", "float16"),
    "queue.start": ("random", "empty"),
    "memory_bank.init": ("random", "encode"),
    "memory_bank.positive": ("bank", "key"),
    "memory_bank.update": ("refresh", "momentum", "both"),
    "optim.name": ("sgd", "lars", "adamw"),
    "optim.schedule": ("cosine", "linear", "step", "constant"),
    "optim.lr_scaling": ("none", "linear"),
    "linear.schedule": ("step", "cosine"),
    "linear.lr_scaling": ("none", "linear"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "eval.knn_features": ("backbone", "head"),
    "track.wandb.mode": ("", "online", "offline", "disabled"),
}


def validate(cfg: Config) -> None:
    """Reject values that type-check but make no sense, naming the key and the rule."""

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' = {value!r}: {rule}")

    # No setting takes NaN or ±inf: none is meaningful there, and each would poison the run.
    for key in valid_keys():
        value = setting(cfg, key)
        if isinstance(value, float):
            need(math.isfinite(value), key, value, "must be a finite number")
    need(DEVICE.match(cfg.train.device) is not None, "train.device", cfg.train.device, "not a device (auto, cpu, cuda or cuda:N)")
    need(cfg.train.seed >= 0, "train.seed", cfg.train.seed, "must be >= 0")
    need(0 <= cfg.data.max_bad_images < 1, "data.max_bad_images", cfg.data.max_bad_images, "must lie in [0, 1)")
    for group in ("optim", "linear"):
        opt = getattr(cfg, group)
        need(0 <= opt.momentum <= 1, f"{group}.momentum", opt.momentum, "SGD momentum must lie in [0, 1]")
        need(opt.weight_decay >= 0, f"{group}.weight_decay", opt.weight_decay, "must be >= 0")
        need(opt.gamma > 0, f"{group}.gamma", opt.gamma, "must be > 0")
        need(all(m >= 0 for m in opt.milestones), f"{group}.milestones", opt.milestones, "epochs must be >= 0")
    need(cfg.track.collapse_threshold >= 0, "track.collapse_threshold", cfg.track.collapse_threshold, "must be >= 0")
    for key in ("pair_margin", "triplet_margin", "lifted_margin"):
        need(getattr(cfg.loss, key) >= 0, f"loss.{key}", getattr(cfg.loss, key), "must be >= 0")
    # A bool of old configs and checkpoints arrives as "True"/"False": the same choice.
    cfg.queue.mask_same_instance = str(cfg.queue.mask_same_instance).lower()
    for key, choices in CHOICES.items():
        value = setting(cfg, key)
        need(value in choices, key, value, f"must be one of {', '.join(choices)}")
    chosen = chosen_entries(cfg)  # every registry-backed name: registered, or one line listing those that are
    needs = chosen["loss.name"].needs  # the kinds of negatives a loss needs, where the method takes both
    need(covers(method_ignores(chosen["method"]), "loss.name") or not needs or cfg.negatives.kind in needs,
         "loss.name", cfg.loss.name, f"it needs negatives.kind={' or '.join(needs)}, not {cfg.negatives.kind}")
    refused = chosen["method"].refuses.get(cfg.negatives.kind)
    need(refused is None, "negatives.kind", cfg.negatives.kind, f"method={cfg.method} {refused}")
    for key in PARAMS:
        group = key.split(".")[0]
        declared = params_of(chosen[key])
        params = setting(cfg, f"{group}.params")
        for name in params:
            need(name in declared, f"{group}.params.{name}", params[name],
                 f"{key}={setting(cfg, key)} takes no such parameter"
                 f" ({'it takes ' + ', '.join(declared) if declared else 'it takes none'})")
        # The defaults of those not given, so config.yaml and checkpoints record every value used.
        params.update({name: value for name, value in declared.items() if name not in params})
    if chosen["method"].pairs:  # two towers: the text tower's names and params, as model's
        text_arch = registry("model.arch")[cfg.text_model.arch]
        registry("model.head")[cfg.text_model.head]
        declared = params_of(text_arch)
        for name in cfg.text_model.params:
            need(name in declared, f"text_model.params.{name}", cfg.text_model.params[name],
                 f"text_model.arch={cfg.text_model.arch} takes no such parameter"
                 f" ({'it takes ' + ', '.join(declared) if declared else 'it takes none'})")
        cfg.text_model.params.update({n: v for n, v in declared.items() if n not in cfg.text_model.params})
    need(0 <= cfg.loss.distill_alpha <= 1, "loss.distill_alpha", cfg.loss.distill_alpha, "must lie in [0, 1]")
    need(not cfg.loss.learn_temperature or 0.001 <= cfg.loss.temperature <= 0.5, "loss.temperature",
         cfg.loss.temperature, "a learned T starts inside its clamp [0.001, 0.5] (loss.learn_temperature=true)")
    need(cfg.queue.size >= 1, "queue.size", cfg.queue.size, "K must be >= 1")
    need(0.0 <= cfg.memory_bank.momentum <= 1.0, "memory_bank.momentum", cfg.memory_bank.momentum, "must lie in [0, 1]")
    need(cfg.model.dim >= 1, "model.dim", cfg.model.dim, "must be >= 1")
    need(cfg.model.hidden_dim >= 0, "model.hidden_dim", cfg.model.hidden_dim, "must be >= 0")
    need(0.0 <= cfg.model.momentum <= 1.0, "model.momentum", cfg.model.momentum, "m must lie in [0, 1]")
    need(cfg.model.bn_splits >= 1, "model.bn_splits", cfg.model.bn_splits, "must be >= 1")
    need(cfg.model.patch_size >= 1, "model.patch_size", cfg.model.patch_size, "must be >= 1")
    split_bn = not covers(method_ignores(chosen["method"]), "model.bn_splits")  # itc's image tower has none
    need(cfg.model.bn != "sync" or cfg.model.bn_splits == 1 or not split_bn, "model.bn_splits", cfg.model.bn_splits,
         "must be 1 with model.bn=sync (SyncBN normalises over the global batch)")
    need(cfg.loss.temperature > 0, "loss.temperature", cfg.loss.temperature, "T must be > 0")
    need(0 <= cfg.loss.tau_plus < 1, "loss.tau_plus", cfg.loss.tau_plus, "must lie in [0, 1)")
    for key in ("mochi_hardest", "mochi_mix", "mochi_mix_query"):
        need(getattr(cfg.loss, key) >= 0, f"loss.{key}", getattr(cfg.loss, key), "must be >= 0")
    need(cfg.loss.byol_hidden_dim >= 1, "loss.byol_hidden_dim", cfg.loss.byol_hidden_dim, "must be >= 1")
    need(cfg.optim.lr >= 0, "optim.lr", cfg.optim.lr, "must be >= 0")
    need(cfg.optim.batch_size >= 1, "optim.batch_size", cfg.optim.batch_size, "must be >= 1")
    need(
        cfg.optim.batch_size >= cfg.model.bn_splits or not split_bn,
        "model.bn_splits",
        cfg.model.bn_splits,
        f"cannot exceed optim.batch_size ({cfg.optim.batch_size})",
    )
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", cfg.optim.betas,
         "must be two numbers in [0, 1)")
    need(cfg.optim.eps > 0, "optim.eps", cfg.optim.eps, "must be > 0")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", cfg.optim.warmup_epochs, "must be >= 0")
    need(cfg.optim.trust_coefficient > 0, "optim.trust_coefficient", cfg.optim.trust_coefficient, "must be > 0")
    need(cfg.train.epochs >= 1, "train.epochs", cfg.train.epochs, "must be >= 1")
    need(cfg.train.steps >= 0, "train.steps", cfg.train.steps, "must be >= 0 (0: train.epochs epochs)")
    need(cfg.train.steps_per_epoch >= 0, "train.steps_per_epoch", cfg.train.steps_per_epoch, "must be >= 0")
    need(cfg.train.log_every >= 1, "train.log_every", cfg.train.log_every, "must be >= 1")
    need(cfg.train.max_nonfinite_skips >= 0, "train.max_nonfinite_skips", cfg.train.max_nonfinite_skips, "must be >= 0")
    need(cfg.train.save_every >= 1, "train.save_every", cfg.train.save_every, "must be >= 1")
    need(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", cfg.train.keep_checkpoints, "must be >= 1")
    need(bool(cfg.train.out_dir), "train.out_dir", cfg.train.out_dir, "must name a folder")
    need(cfg.data.image_size >= 8, "data.image_size", cfg.data.image_size, "must be >= 8")
    need(0 <= cfg.data.crop_min < 1, "data.crop_min", cfg.data.crop_min, "must lie in [0, 1)")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "must be >= 0")
    need(cfg.data.synthetic_size >= 2, "data.synthetic_size", cfg.data.synthetic_size, "must be >= 2")
    need(cfg.data.synthetic_classes >= 2, "data.synthetic_classes", cfg.data.synthetic_classes, "must be >= 2")
    need(
        cfg.data.name not in ("cifar10", "imagefolder") or bool(cfg.data.root),
        "data.root",
        cfg.data.root,
        f"data.name={cfg.data.name} needs a data folder",
    )
    text = cfg.data.text
    need(text.vocab_size >= 16, "data.text.vocab_size", text.vocab_size, "must be >= 16")
    need(2 <= text.chunk_length <= 65536, "data.text.chunk_length", text.chunk_length, "must lie in [2, 65536]")
    need(0 < text.ratio_min <= text.ratio_max <= 1, "data.text.ratio_min", text.ratio_min,
         f"need 0 < data.text.ratio_min <= data.text.ratio_max ({text.ratio_max}) <= 1")
    for key in ("deletion", "replacement", "masking"):
        need(0 <= getattr(text, key) < 1, f"data.text.{key}", getattr(text, key), "must lie in [0, 1)")
    need(text.deletion + text.replacement + text.masking < 1, "data.text.masking", text.masking,
         "data.text.deletion + replacement + masking must be < 1")
    need(text.max_length >= 3, "data.text.max_length", text.max_length, "must be >= 3 ([CLS], a token, [SEP])")
    need(text.query_max_length == 0 or text.query_max_length >= 3, "data.text.query_max_length", text.query_max_length,
         "must be 0 (as max_length) or >= 3 ([CLS], a token, [SEP])")
    need(cfg.eval.knn_every >= 0, "eval.knn_every", cfg.eval.knn_every, "must be >= 0")
    need(cfg.eval.knn_k >= 1, "eval.knn_k", cfg.eval.knn_k, "must be >= 1")
    need(cfg.eval.knn_t > 0, "eval.knn_t", cfg.eval.knn_t, "must be > 0")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    need(cfg.track.preview >= 0, "track.preview", cfg.track.preview, "must be >= 0")
    need(cfg.linear.epochs >= 1, "linear.epochs", cfg.linear.epochs, "must be >= 1")
    need(cfg.linear.lr > 0, "linear.lr", cfg.linear.lr, "must be > 0")
    need(cfg.linear.batch_size >= 1, "linear.batch_size", cfg.linear.batch_size, "must be >= 1")


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

#: The registry-backed settings whose entries may take options the schema lacks: ``<group>.params``.
PARAMS = ("model.arch", "loss.name", "data.name")


def chosen_entries(cfg: Config) -> dict[str, Any]:
    """The registry entry each registry-backed setting of ``cfg`` names.

    Raises:
        ConfigError: a name no entry is registered under; the message lists those that are.
    """
    return {key: registry(key)[setting(cfg, key)] for key in OWNERS}


def method_ignores(entry: Any) -> tuple[str, ...]:
    """The settings a method's entry ignores: its ``ignores``, and without negatives
    ``negatives.kind`` and every setting a kind of negatives reads."""
    # Only a method on pairs reads the second tower and image-text contrast's settings.
    two_towers = () if entry.pairs else ("text_model", "model.locked", "loss.learn_temperature", "loss.distill_alpha",
                                         "queue.start")
    if entry.negatives:
        return (*entry.ignores, *two_towers)
    return ("negatives", *(r for kind in registry("negatives.kind").entries.values() for r in reads(kind)),
            *entry.ignores, *two_towers)


#: The settings that are open dicts (a registered part's options the schema lacks), each with the
#: setting whose registry entry declares their defaults ("": none declared).
OPEN_DICTS = {"model.params": "model.arch", "text_model.params": "text_model.arch", "loss.params": "loss.name",
              "data.params": "data.name", "model.timm_kwargs": "", "text_model.timm_kwargs": ""}


def changed_settings(cfg: Config) -> dict[str, Any]:
    """The settings of ``cfg`` that differ from the defaults, as {dotted key: value}; an open dict's
    entries (:data:`OPEN_DICTS`: ``text_model.params.layers``) one by one, each against the default
    its registry entry declares (``validate`` fills those in)."""
    defaults = Config()
    changed = {k: setting(cfg, k) for k in valid_keys() if setting(cfg, k) != setting(defaults, k)}
    for group, named_by in OPEN_DICTS.items():
        declared: dict[str, Any] = {}
        if named_by:
            entries = registry("model.arch" if named_by.endswith(".arch") else named_by)
            name = setting(cfg, named_by)
            declared = params_of(entries[name]) if name in entries else {}
        for name, value in setting(cfg, group).items():
            if name not in declared or declared[name] != value:
                changed[f"{group}.{name}"] = value
    return changed


def ignored_by_choice(cfg: Config) -> dict[str, list[str]]:
    """Settings changed from their defaults that the chosen parts ignore, as ``key=value``, by
    the choice that ignores them (``"negatives.kind=in_batch": ["queue.size=4096"]``).

    The method ignores what its entry says (:func:`method_ignores`: BYOL the negatives and the
    loss, MoCo v3 the loss). Each other registry-backed choice ignores what other entries of its
    registry read and the chosen one does not (their ``reads``). A warning, not an error: a
    sweep may share settings across choices.
    """
    values = changed_settings(cfg)
    changed = list(values)
    out: dict[str, list[str]] = {}

    def ignore(choice: str, keys: list[str]) -> None:
        seen = {k.split("=")[0] for found in out.values() for k in found}
        keys = [k for k in keys if k not in seen]
        if keys:
            out.setdefault(choice, []).extend(f"{k}={values[k]}" for k in keys)

    chosen = chosen_entries(cfg)
    by_method = method_ignores(chosen["method"])
    ignore(f"method={cfg.method}", [k for k in changed if covers(by_method, k)])
    for key, entry in chosen.items():
        if covers(by_method, key):  # a choice the method ignores ignores nothing itself
            continue
        governed = tuple(r for other in registry(key).entries.values() for r in reads(other))
        ignore(f"{key}={setting(cfg, key)}", [k for k in changed if covers(governed, k) and not covers(reads(entry), k)])
    return out


def ignored_warning(cfg: Config) -> str | None:
    """The one warning line a run prints for :func:`ignored_by_choice`, or None."""
    ignored = ignored_by_choice(cfg)
    return ("warning: " + "; ".join(f"{choice} ignores {', '.join(keys)}" for choice, keys in ignored.items())
            if ignored else None)


def ignored_settings(cfg: Config) -> list[str]:
    """Every setting :func:`ignored_by_choice` names, as ``key=value``."""
    return [k for found in ignored_by_choice(cfg).values() for k in found]
