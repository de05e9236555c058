"""The authors' parameter names of the VSRN / SAEM fixtures mapped onto itm's contract names
(docs/vsrn.md, docs/saem.md), and loading by those names as an outside test does: a state_dict key
equal to a contract name, or ending in ``.`` + the name (the longest such name wins)."""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn


def _tensor(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(v))


def _conv1x1(t: torch.Tensor) -> torch.Tensor:
    """A Conv1d(d, d, 1) weight ``[d, d, 1]`` as the Linear weight ``[d, d]``."""
    return t[..., 0] if t.dim() == 3 else t


def vsrn_contract(z: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Contract name -> tensor for every VSRN parameter of the fixture."""
    out: dict[str, torch.Tensor] = {}
    for key, value in z.items():
        if value.dtype.kind in "US":
            continue
        t = _tensor(value)
        if m := re.fullmatch(r"img_enc\.fc\.(.+)", key):
            out[f"image_encoder.fc.{m[1]}"] = t
        elif m := re.fullmatch(r"img_enc\.Rs_GCN_(\d+)\.(g|theta|phi)\.(.+)", key):
            out[f"image_encoder.gcn.{int(m[1]) - 1}.{m[2]}.{m[3]}"] = _conv1x1(t)
        elif m := re.fullmatch(r"img_enc\.Rs_GCN_(\d+)\.W\.0\.(.+)", key):
            out[f"image_encoder.gcn.{int(m[1]) - 1}.out.{m[2]}"] = _conv1x1(t)
        elif m := re.fullmatch(r"img_enc\.Rs_GCN_(\d+)\.W\.1\.(.+)", key):
            out[f"image_encoder.gcn.{int(m[1]) - 1}.bn.{m[2]}"] = t
        elif m := re.fullmatch(r"img_enc\.img_rnn\.(.+)", key):
            out[f"image_pool.gru.{m[1]}"] = t
        elif m := re.fullmatch(r"img_enc\.bn\.(.+)", key):
            out[f"image_pool.bn.{m[1]}"] = t
        elif m := re.fullmatch(r"txt_enc\.(embed|rnn)\.(.+)", key):
            out[f"text_encoder.{m[1]}.{m[2]}"] = t
        elif m := re.fullmatch(r"caption_model\.(.+)", key):
            out[f"aux.{m[1]}"] = t
    return out


def _layer_norm(name: str) -> str:
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )


def saem_image_contract(z: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Contract name -> tensor of the ``transformer`` image encoder (authors' TransformerMapping)."""
    out = {}
    for key, value in z.items():
        if m := re.fullmatch(r"img_enc\.mapping\.(.+)", key):
            out[f"image_encoder.fc.{m[1]}"] = _tensor(value)
        elif m := re.fullmatch(r"img_enc\.(layer\..+)", key):
            out[f"image_encoder.{_layer_norm(m[1])}"] = _tensor(value)
    return out


def saem_text_contract(z: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Contract name -> tensor of the ``bert_cnn`` text encoder (authors' BertMapping); the
    unused pooler is left out."""
    out = {}
    for key, value in z.items():
        if m := re.fullmatch(r"txt_enc\.bert\.(.+)", key):
            if not m[1].startswith("pooler."):
                out[f"text_encoder.bert.{_layer_norm(m[1])}"] = _tensor(value)
        elif m := re.fullmatch(r"txt_enc\.convs1\.(.+)", key):
            out[f"text_encoder.convs.{m[1]}"] = _tensor(value)
        elif m := re.fullmatch(r"txt_enc\.mapping\.(.+)", key):
            out[f"text_encoder.fc.{m[1]}"] = _tensor(value)
    return out


def load_by_contract(
    module: nn.Module, named: dict[str, torch.Tensor], strip: str = ""
) -> list[str]:
    """Load ``named`` (contract name -> tensor) into ``module``: each state_dict key takes the
    LONGEST name it equals or ends with (``.`` + name). ``strip`` drops a leading component
    prefix of the names (e.g. ``"image_encoder."`` to load into the encoder alone). Every name
    must be used and every key (but ``num_batches_tracked``) filled; shapes must agree.
    Returns the keys that were loaded."""
    names = {k[len(strip) :]: v for k, v in named.items() if k.startswith(strip)}
    state = module.state_dict()
    used: set[str] = set()
    new_state = {}
    for key, current in state.items():
        matches = [n for n in names if key == n or key.endswith("." + n)]
        if not matches:
            assert key.endswith("num_batches_tracked"), f"no contract name for {key}"
            continue
        name = max(matches, key=len)
        value = names[name]
        assert value.shape == current.shape, f"{key} <- {name}: {value.shape} vs {current.shape}"
        new_state[key] = value.to(current.dtype)
        used.add(name)
    missing = set(names) - used
    assert not missing, f"contract names without a parameter: {sorted(missing)}"
    module.load_state_dict(new_state, strict=False)
    return sorted(new_state)
