"""VSRN's caption-generation objective (Li et al., ICCV 2019), docs/vsrn.md:
``model/aux=caption``.

An attention-based sequence-to-sequence captioner (the S2VT-style model the authors reuse)
reads the reasoned region features V* and must generate the image's caption with teacher
forcing; its negative log-likelihood is added to the matching loss, so the region features
have to keep what a caption describes. The captioner is thrown away after training (the
authors do not save it).

Sub-module names follow the authors' ``caption_model`` (``encoder.vid2hid``, ``encoder.rnn``,
``decoder.embedding``, ``decoder.attention.linear1`` / ``linear2``, ``decoder.rnn``,
``decoder.out``), so their state_dict loads one to one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm.models.auxiliary.base import AuxLoss
from itm.models.functional import lengths_to_mask

__all__ = ["CaptionLoss"]

PAD_ID, END_ID = 0, 2  # the SCAN / VSRN vocabulary's <pad> and <end>


class _Encoder(nn.Module):
    """``vid2hid`` Linear(d, h) (Xavier-normal weight) -> Dropout -> GRU(h, h) over the
    valid regions."""

    def __init__(self, embed_size: int, dim_hidden: int, dropout: float) -> None:
        super().__init__()
        self.vid2hid = nn.Linear(embed_size, dim_hidden)
        nn.init.xavier_normal_(self.vid2hid.weight)
        self.input_dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(dim_hidden, dim_hidden, batch_first=True)

    def forward(self, v: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``v [B, K, d]`` -> (outputs ``[B, K, h]``, 0 past a length; final state ``[B, h]``)."""
        u = self.input_dropout(self.vid2hid(v))
        packed = pack_padded_sequence(
            u, lengths.detach().cpu().clamp_min(1), batch_first=True, enforce_sorted=False
        )
        out, state = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=v.shape[1])
        return out, state[0]


class _Attention(nn.Module):
    """``alpha = softmax_r linear2(tanh(linear1([o_r ; s])))`` over the valid regions."""

    def __init__(self, dim_hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(2 * dim_hidden, dim_hidden)
        self.linear2 = nn.Linear(dim_hidden, 1, bias=False)


class _Decoder(nn.Module):
    """``embedding`` (N(0, 1)), ``attention``, ``rnn`` GRU(w + h, h) on ``[word ; context]``,
    ``out`` Linear(h, vocab) (Xavier-normal weight)."""

    def __init__(self, vocab_size: int, dim_hidden: int, dim_word: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim_word)  # torch's default init is N(0, 1)
        self.attention = _Attention(dim_hidden)
        self.rnn = nn.GRU(dim_word + dim_hidden, dim_hidden, batch_first=True)
        self.out = nn.Linear(dim_hidden, vocab_size)
        nn.init.xavier_normal_(self.out.weight)
        self.input_dropout = nn.Dropout(dropout)


class CaptionLoss(AuxLoss):
    """``aux(v [B, K, d], img_lens [B], tokens [B, L], cap_lens [B]) -> scalar``: the summed
    word negative log-likelihood of caption i given image i, divided by the batch size B.

    Labels: the caption's ids (``<start>`` ... ``<end>``); a caption of ``n >= max_len`` tokens
    keeps its first ``max_len`` with the last set to ``<end>``; ``<pad>`` (0) follows. With
    ``T = min(n, max_len - 1)``, targets ``y_1 .. y_T`` are predicted from inputs
    ``y_0 .. y_{T-1}``, so a caption shorter than ``max_len`` also has the ``<pad>`` after its
    ``<end>`` as a target (the decoder learns to emit 0), as in the authors' code. The loss is
    divided by B, not by the number of targets.

    One decoding step (teacher forcing), from the encoder's outputs ``o_r`` and final state
    ``s_0``: ``alpha = softmax_r linear2(tanh(linear1([o_r ; s_t])))`` over the valid regions,
    ``c_t = sum_r alpha_r o_r``, ``s_{t+1} = GRU(drop([E(y_t) ; c_t]), s_t)``,
    ``l_t = -log softmax(out(s_{t+1}))[y_{t+1}]``.

    Cost: the steps run only as far as the batch's longest target sequence (later steps have no
    target). The parts that do not depend on the recurrent state are batched over all steps: the
    word half of the GRU input projection (one product), the region half of ``linear1`` (once
    per image) and the output layer with its softmax (one product over the targets). Each step
    then costs the attention over K regions and one GRU cell.

    Args:
        weight: loss weight (1.0; constant, see :meth:`weight_at`).
        vocab_size: caption vocabulary size (the data's; the recipes take the text encoder's).
        embed_size: size d of the region features V*.
        dim_hidden: hidden size h of the captioner (512).
        dim_word: word embedding size w of the decoder (300).
        max_len: longest label sequence, ``<start>`` and ``<end>`` included (60).
        input_dropout: dropout of the encoder's input and of the decoder's step input (0.2).
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"input_dropout"})

    inputs = "fragments"

    def __init__(
        self,
        weight: float = 1.0,
        vocab_size: int | None = None,
        embed_size: int = 2048,
        dim_hidden: int = 512,
        dim_word: int = 300,
        max_len: int = 60,
        input_dropout: float = 0.2,
    ) -> None:
        super().__init__(weight)
        if vocab_size is None or int(vocab_size) < 3:
            raise ValueError(
                f"model.aux.vocab_size must be the caption vocabulary's size (>= 3), got "
                f"{vocab_size} (the caption loss reads the data's word ids; train.py sets it "
                "from a bigru text encoder's vocabulary)"
            )
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (<start> and one target), got {max_len}")
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.encoder = _Encoder(embed_size, dim_hidden, input_dropout)
        self.decoder = _Decoder(self.vocab_size, dim_hidden, dim_word, input_dropout)

    def labels(self, tokens: Tensor, cap_lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forcing ``inputs [B, T]``, ``targets [B, T]`` and ``target_mask [B, T]``
        (``T`` = the batch's longest ``min(n, max_len - 1)``)."""
        lens = cap_lens.to(tokens.device)
        steps = lens.clamp_max(self.max_len - 1)  # targets per caption
        t_max = max(int(steps.max()), 1) if steps.numel() else 1
        y = tokens.masked_fill(~lengths_to_mask(lens, tokens.shape[1]), PAD_ID)
        y = F.pad(y, (0, max(0, t_max + 1 - y.shape[1])), value=PAD_ID)[:, : t_max + 1].clone()
        cut = lens >= self.max_len  # only then is column max_len - 1 within the labels
        if bool(cut.any()):
            y[cut, self.max_len - 1] = END_ID
        if int(y.max()) >= self.vocab_size or int(y.min()) < 0:
            raise ValueError(
                f"caption token ids must lie in 0..{self.vocab_size - 1} (model.aux.vocab_size), "
                f"got min {int(y.min())}, max {int(y.max())}"
            )
        return y[:, :t_max], y[:, 1:], lengths_to_mask(steps, t_max)

    def forward(self, v: Tensor, img_lens: Tensor, tokens: Tensor, cap_lens: Tensor) -> Tensor:
        b, k, _ = v.shape
        if b == 0:
            return v.new_zeros(())
        region_mask = lengths_to_mask(img_lens.to(v.device), k)  # [B, K]
        enc, state = self.encoder(v.masked_fill(~region_mask[..., None], 0.0), img_lens)
        inputs, targets, target_mask = self.labels(tokens, cap_lens)
        dec = self.decoder
        h, w = state.shape[1], dec.embedding.embedding_dim
        rnn: nn.GRU = dec.rnn
        # weight_ih_l0 [3h, w + h], weight_hh_l0 [3h, h], bias_ih_l0, bias_hh_l0
        w_ih, w_hh, b_ih, b_hh = rnn.all_weights[0]
        lin1: nn.Linear = dec.attention.linear1  # [h, 2h] on [o_r ; s_t]
        # state-free parts, batched: the word half of the GRU input, the region half of linear1
        words = dec.input_dropout(dec.embedding(inputs))  # [B, T, w]
        gate_words = F.linear(words, w_ih[:, :w], b_ih)  # [B, T, 3h]
        att_regions = F.linear(enc, lin1.weight[:, :h], lin1.bias)  # [B, K, h]
        # the state halves, sliced once and contiguous: every step reuses them (a per-step
        # column slice would cost a strided product and a full-size gradient buffer per step)
        w_att_state = lin1.weight[:, h:].contiguous()
        w_context = w_ih[:, w:].contiguous()
        lin2: nn.Linear = dec.attention.linear2
        score_w = lin2.weight[0]  # [h]
        states = []
        s = state
        # unbind once: indexing [:, t] per step would give each step's gradient a full-size
        # zero buffer
        for gate_word in gate_words.unbind(dim=1):
            e = torch.tanh(att_regions + F.linear(s, w_att_state)[:, None]) @ score_w  # [B, K]
            alpha = e.masked_fill(~region_mask, float("-inf")).softmax(dim=1)
            context = dec.input_dropout(torch.bmm(alpha[:, None], enc)[:, 0])  # [B, h]
            gi = gate_word + F.linear(context, w_context)  # [B, 3h]
            gh = F.linear(s, w_hh, b_hh)
            i_r, i_z, i_n = gi.chunk(3, dim=1)
            h_r, h_z, h_n = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            s = torch.lerp(torch.tanh(i_n + r * h_n), s, z)  # (1 - z) n + z s
            states.append(s)
        hidden = torch.stack(states, dim=1)[target_mask]  # [n_targets, h]
        logits = dec.out(hidden)
        return F.cross_entropy(logits, targets[target_mask], reduction="sum") / b

    def extra_repr(self) -> str:
        return f"weight={self.weight}, vocab_size={self.vocab_size}, max_len={self.max_len}"
