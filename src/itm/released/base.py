"""What every converter of the authors' checkpoints shares: safe reading, the option and weight
bookkeeping, the itm model config built from the project's own recipes, the result.

A converter (one file per authors' repository) reads the checkpoint's ``opt`` through a
:class:`Conversion`, turning each option into Hydra overrides of ``conf/train.yaml`` (the same
overrides ``train.py`` takes, so a converted checkpoint fine-tunes under a config that matches
it), renames the weights onto the itm module names, and lists what had no itm counterpart.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from itm.checkpoint import SAFE_GLOBALS, CheckpointError, read_checkpoint_file

__all__ = [
    "BOOKKEEPING",
    "SAFE_GLOBALS",
    "Conversion",
    "Released",
    "compose_model_config",
    "describe",
    "fc_gru_sizes",
    "hydra_value",
    "map_encoders",
    "map_training",
    "model_list",
    "read_checkpoint",
]

#: the reader (one for every checkpoint: :func:`itm.checkpoint.read_checkpoint_file`) and the
#: one class it allows besides tensors and containers (the authors' ``opt`` Namespace)
read_checkpoint = read_checkpoint_file


def describe(obj: Any, depth: int = 0) -> str:
    """A short account of a loaded object's structure, for "unknown kind" messages."""
    if isinstance(obj, Mapping):
        keys = list(obj)
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        if depth == 0 and "model" in obj:
            return f"a dict with keys [{shown}]; 'model' is {describe(obj['model'], depth + 1)}"
        return f"a dict of {len(keys)} entries [{shown}]"
    if isinstance(obj, (list, tuple)):
        inner = "; ".join(describe(x, depth + 1) for x in obj[:4])
        return f"a {type(obj).__name__} of {len(obj)} ({inner})"
    if isinstance(obj, Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    return f"a {type(obj).__name__}"


def hydra_value(value: Any) -> str:
    """``value`` written as a Hydra command-line override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return text if re.fullmatch(r"[\w.\-/]+", text) else repr(text)


def _config_dir() -> str:
    from itm.cli import config_dir

    return config_dir()


def compose_model_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved ``model`` node of ``conf/train.yaml`` under ``overrides`` (a plain dict).

    Inside a running Hydra app (``eval.py``) the app's config search path is used, otherwise the
    project's ``conf/`` (or ``$ITM_CONFIG_DIR``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if GlobalHydra.instance().is_initialized():
        cfg = compose("train", overrides=overrides)
    else:
        with initialize_config_dir(version_base="1.3", config_dir=_config_dir()):
            cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[return-value]


_MISSING = object()


@dataclass
class Released:
    """An authors' checkpoint converted: the itm model config and weights, and the account.

    Attributes:
        path: the authors' file.
        format: the format's name (``SCAN``, ``BFAN``, ``IMRAM``, ``CHAN``, ``VSE-infinity``,
            ``SGRAF``).
        repository: the authors' repository (``kuanghuei/SCAN``, ...).
        variant: the model in words (``SCAN t2i LogSumExp``).
        overrides: Hydra overrides of ``conf/train.yaml`` that build the same model (and the
            authors' training settings), e.g. for ``train.py ... ckpt_path=<converted file>``.
        model_cfg: the resolved itm ``model`` config (vocabulary size and region feature size
            taken from the weights).
        state_dict: the weights under itm's module names.
        mapped: authors' option -> the itm settings it became.
        unmapped: authors' option -> its value and why it has no itm counterpart.
        dropped: authors' weight -> why it is not carried (never used by the authors'
            forward pass, or a branch the configured model does not have).
        epoch, best_rsum: the authors' bookkeeping, when present.
    """

    path: str
    format: str
    repository: str
    variant: str
    overrides: list[str]
    model_cfg: dict[str, Any]
    state_dict: dict[str, Tensor]
    mapped: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    epoch: int | None = None
    best_rsum: float | None = None

    def build_model(self):
        """The :class:`~itm.models.module.ITMModule` with the converted weights (strict load)."""
        from itm.models.module import ITMModule

        model = ITMModule(self.model_cfg)
        expected = set(model.state_dict())
        missing = sorted(expected - set(self.state_dict))
        extra = sorted(set(self.state_dict) - expected)
        if missing or extra:
            raise CheckpointError(
                f"{self.path} ({self.variant}): the converted weights do not fit the itm model "
                f"built for it (missing {missing[:6]}, unexpected {extra[:6]})"
            )
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:  # a shape that disagrees with the options
            raise CheckpointError(
                f"{self.path} ({self.variant}): its weights do not fit the model its options "
                f"describe: {str(err).splitlines()[-1].strip()}"
            ) from None
        return model

    def summary(self) -> str:
        """What was read and how it maps, in lines for the terminal / log."""
        lines = [f"{self.path}: {self.variant} ({self.format} checkpoint, {self.repository})"]
        if self.epoch is not None:
            lines[0] += f", epoch {self.epoch}"
        if self.best_rsum is not None:
            lines[0] += f", best rsum {self.best_rsum:.2f}"
        lines.append("  options mapped:")
        lines += [f"    {k}: {v}" for k, v in self.mapped.items()]
        if self.unmapped:
            lines.append("  options with no itm counterpart:")
            lines += [f"    {k}: {v}" for k, v in self.unmapped.items()]
        if self.dropped:
            lines.append("  weights not carried:")
            lines += [f"    {k}: {v}" for k, v in self.dropped.items()]
        lines.append("  itm overrides: " + " ".join(self.overrides))
        return "\n".join(lines)


class Conversion:
    """Builder of a :class:`Released`: reads options, records overrides and weights.

    Args:
        ckpt: the loaded checkpoint dict (``model``, ``opt``, ...).
        path: its file (for messages).
        format, repository: the format's name and the authors' repository.
    """

    def __init__(self, ckpt: Mapping[str, Any], path: str | Path, format: str, repository: str):
        self.path, self.format, self.repository = str(path), format, repository
        opt = ckpt.get("opt")
        if isinstance(opt, argparse.Namespace):
            opt = vars(opt)
        if not isinstance(opt, Mapping):
            raise CheckpointError(f"{path}: {format} checkpoint without an 'opt' Namespace")
        self._opt: dict[str, Any] = dict(opt)
        self._read: set[str] = set()
        self.overrides: list[str] = []
        self.mapped: dict[str, list[str]] = {}
        self.unmapped: dict[str, str] = {}
        self.dropped: dict[str, str] = {}
        self.state_dict: dict[str, Tensor] = {}
        self.optional: list[tuple[str, Any, str, str]] = []
        self.epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
        rsum = ckpt.get("best_rsum")
        self.best_rsum = float(rsum) if isinstance(rsum, (int, float)) else None

    # --- options ----------------------------------------------------------------------------

    def option(self, key: str, default: Any = _MISSING) -> Any:
        """The value of option ``key`` (``default`` when the file lacks it), marked as read."""
        self._read.add(key)
        if key in self._opt:
            return self._opt[key]
        if default is _MISSING:
            raise CheckpointError(
                f"{self.path}: {self.format} checkpoint whose opt has no {key!r} (options: "
                f"{', '.join(sorted(self._opt)[:12])}, ...)"
            )
        return default

    def unsupported(self, key: str, value: Any, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: {self.format} checkpoint with {key}={value!r}: {what}"
        )

    def choose(self, key: str, table: Mapping[Any, Any], default: Any = _MISSING) -> Any:
        """``table[option value]``; a value outside ``table`` is a clear error."""
        value = self.option(key, default)
        if value not in table:
            raise self.unsupported(key, value, f"itm supports {', '.join(repr(v) for v in table)}")
        return table[value]

    def set(self, target: str, value: Any, *options: str) -> None:
        """Override ``target=value`` (a config key, or a group such as ``pooling``), recorded as
        what ``options`` became."""
        text = f"{target}={hydra_value(value)}"
        self.overrides.append(text)
        for key in options:
            self._read.add(key)
            self.mapped.setdefault(key, []).append(text)

    def map(
        self,
        key: str,
        target: str,
        convert: Callable[[Any], Any] = lambda v: v,
        default: Any = _MISSING,
    ) -> Any:
        """Option ``key`` -> override ``target=convert(value)``; returns the value."""
        value = self.option(key, default)
        self.set(target, convert(value), key)
        return value

    def explain(self, key: str, text: str) -> None:
        """Option ``key`` read and mapped by the recipe itself (no override), as ``text``."""
        self._read.add(key)
        self.mapped.setdefault(key, []).append(text)

    def note(self, key: str, reason: str) -> None:
        """Option ``key``, when the file has it, read with no itm counterpart: ``reason``."""
        if key in self._opt:
            self._read.add(key)
            self.unmapped[key] = f"{_short(self._opt[key])}: {reason}"

    def set_if_offered(self, target: str, value: Any, option: str, what: str) -> None:
        """Override ``target=value`` when the composed model config has that key (a field
        this itm version may not offer yet); else list ``option`` as without counterpart."""
        self.optional.append((target, value, option, what))

    # --- weights ----------------------------------------------------------------------------

    def weights(
        self,
        source: Mapping[str, Tensor],
        where: str,
        renames: Iterable[tuple[str, str]],
        drop: Mapping[str, str] | None = None,
    ) -> None:
        """Carry the tensors of ``source`` over under new names.

        Args:
            source: an authors' state dict.
            where: its place in the checkpoint, for messages (``model[1]``).
            renames: ``(authors' prefix, itm prefix)`` pairs; the first whose prefix starts a
                key renames it (an exact key is a prefix of itself).
            drop: ``{authors' prefix: reason}``: keys starting so are not carried.

        Raises:
            CheckpointError: for a key no rule covers (a file of another layout).
        """
        if not isinstance(source, Mapping):
            raise CheckpointError(
                f"{self.path}: {self.format} checkpoint whose {where} is {describe(source)}, "
                "expected a state dict"
            )
        rules = list(renames)
        drop = dict(drop or {})
        for key, tensor in source.items():
            if not isinstance(tensor, Tensor):
                raise CheckpointError(f"{self.path}: {where}[{key!r}] is not a tensor")
            gone = next((p for p in drop if key.startswith(p)), None)
            if gone is not None:
                self.dropped[f"{where}[{key}]"] = drop[gone]
                continue
            rule = next((r for r in rules if key.startswith(r[0])), None)
            if rule is None:
                raise CheckpointError(
                    f"{self.path}: {self.format} checkpoint holds {where}[{key!r}] "
                    f"{list(tensor.shape)}, a weight this format's mapping does not know"
                )
            self.state_dict[rule[1] + key[len(rule[0]) :]] = tensor

    # --- result -----------------------------------------------------------------------------

    def finish(
        self, variant: str, bookkeeping: Mapping[str, str], sizes: Callable[[dict], None]
    ) -> Released:
        """The :class:`Released`; ``sizes(model_cfg)`` fills in what the weights fix
        (vocabulary size, region feature size). Options never read are listed with
        ``bookkeeping[key]`` as the reason, or as not read by itm."""
        for key in sorted(set(self._opt) - self._read):
            reason = bookkeeping.get(key, "not read by itm")
            self.unmapped[key] = f"{_short(self._opt[key])}: {reason}"
        model_cfg = compose_model_config(self.overrides)
        for target, value, option, what in self.optional:
            *parents, leaf = target.split(".")[1:]  # below "model."
            node = model_cfg
            for name in parents:
                node = node.get(name) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node:
                node[leaf] = value
                self.overrides.append(f"{target}={hydra_value(value)}")
                self.mapped.setdefault(option, []).append(f"{target}={hydra_value(value)}")
            else:
                self.unmapped[option] = f"{value!r}: {what} (no {target} in this itm version)"
        sizes(model_cfg)
        return Released(
            path=self.path,
            format=self.format,
            repository=self.repository,
            variant=variant,
            overrides=list(self.overrides),
            model_cfg=model_cfg,
            state_dict=self.state_dict,
            mapped={k: ", ".join(v) for k, v in self.mapped.items()},
            unmapped=self.unmapped,
            dropped=self.dropped,
            epoch=self.epoch,
            best_rsum=self.best_rsum,
        )


def _short(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"<{len(value)} entries>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: run bookkeeping every authors' trainer stores in its opt: paths, logging, data loading
BOOKKEEPING: dict[str, str] = {
    "data_path": "data location (itm: data.root)",
    "data_name": "data set name (itm: data=...)",
    "vocab_path": "vocabulary location (itm: data.vocab_path)",
    "logger_name": "log directory of the authors' run",
    "model_name": "checkpoint directory of the authors' run",
    "resume": "the authors' resume path",
    "workers": "data loader workers (itm: data.num_workers)",
    "log_step": "logging interval",
    "val_step": "validation interval in iterations (itm validates every epoch)",
    "gpuid": "the authors' GPU choice",
    "seed": "the authors' random seed (itm: seed)",
    "img_dim": "the region feature size (itm reads it off the fc weight)",
    "vocab_size": "the word table's rows (itm reads them off the embedding)",
}


def map_encoders(conv: Conversion, bidirectional: bool | None = None) -> None:
    """The options of the fc image encoder and the BiGRU text encoder every repository shares:
    sizes, GRU layers and directions (``bi_gru``, or fixed by the authors' code when
    ``bidirectional`` is given), per-fragment l2 normalisation."""
    conv.map("embed_size", "model.embed_size", int)
    conv.map("word_dim", "model.text_encoder.word_dim", int)
    conv.map("num_layers", "model.text_encoder.num_layers", int, default=1)
    if bidirectional is None:
        conv.map("bi_gru", "model.text_encoder.bidirectional", bool)
    else:
        conv.set("model.text_encoder.bidirectional", bidirectional)
    conv.map("no_imgnorm", "model.image_encoder.norm", lambda v: not v, default=False)
    conv.map("no_txtnorm", "model.text_encoder.norm", lambda v: not v, default=False)


def map_training(conv: Conversion) -> None:
    """The training options every repository shares (used when fine-tuning a converted file)."""
    conv.map("margin", "model.loss.margin", float)
    conv.map("max_violation", "model.loss.max_violation", bool, default=False)
    conv.map("learning_rate", "model.optimizer.lr", float)
    conv.map("lr_update", "model.scheduler.step_size", int)
    conv.map("num_epochs", "trainer.max_epochs", int)
    conv.map("grad_clip", "trainer.gradient_clip_val", float)
    conv.map("batch_size", "data.batch_size", int)


def fc_gru_sizes(state_dict: Mapping[str, Tensor]) -> Callable[[dict], None]:
    """``sizes`` for :meth:`Conversion.finish`: the vocabulary size is the word table's rows,
    the region feature size the image ``fc``'s input size."""

    def sizes(model_cfg: dict) -> None:
        model_cfg["text_encoder"]["vocab_size"] = int(
            state_dict["text_encoder.embed.weight"].shape[0]
        )
        model_cfg["image_encoder"]["img_dim"] = int(state_dict["image_encoder.fc.weight"].shape[1])

    return sizes


def model_list(conv: Conversion, ckpt: Mapping[str, Any], n: int) -> list[Mapping[str, Tensor]]:
    """The checkpoint's ``model`` entry, a list of ``n`` state dicts."""
    parts = ckpt.get("model")
    if not isinstance(parts, (list, tuple)) or len(parts) != n:
        raise CheckpointError(
            f"{conv.path}: {conv.format} checkpoint whose 'model' is {describe(parts)}, "
            f"expected a list of {n} state dicts"
        )
    return list(parts)


#: the GRU's parameter names (torch's), copied as they are
GRU_RENAME = ("rnn.", "text_encoder.rnn.")
