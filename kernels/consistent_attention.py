"""Consistent self-attention (StoryDiffusion), pure torch.

Self-attention of the UNet up blocks is replaced so that every image of a story batch also
attends to a random sample of the tokens of its character's reference images:

- *write* (reference images, the first ``id_length`` panels of a character): keys/values of
  image ``i`` = sampled tokens of the character's other reference images + all own tokens;
- *read* (every later panel): keys/values = the sampled reference tokens of every character
  named in the panel (from the same batch, or from a bank kept from an earlier pass at the
  same step and layer) + all own tokens.

Queries are always the image's own tokens. Everything works on already projected
``q, k, v`` (the shape ComfyUI's ``attn1`` replacement receives): attention is linear in
the projections, so sampling hidden states and projecting them equals projecting and
then sampling.

Memory: :func:`consistent_attention` attends ``window`` rows at a time, each against only
its own key/value set, so peak memory is bounded by the window and not by the number of
panels. :func:`consistent_attention_dense` is the straightforward untiled form of the same
maths (one joint attention over the whole batch with a block mask), kept as the reference
for tests and benchmarks.

:class:`ConsistentSelfAttention` holds the state of one story run (step, sampled token
masks, gates, bank); nothing lives in module globals.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "consistent_attention",
    "consistent_attention_dense",
    "StoryLayout",
    "ConsistentSelfAttention",
    "SCHEDULES",
]

SCHEDULES = ("lowvram", "app")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on projected tokens.

    q: (B, Nq, D); k, v: (B, Nk, D); mask: bool, broadcastable to (B, heads, Nq, Nk),
    True = may attend. Returns (B, Nq, D). Scale ``1/sqrt(D/heads)``.
    """
    b, nq, d = q.shape
    if d % heads:
        raise ValueError(f"heads: inner dim {d} is not divisible by {heads} heads")
    hd = d // heads
    qh = q.view(b, nq, heads, hd).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, hd).transpose(1, 2)
    vh = v.reshape(b, v.shape[1], heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, nq, d)


def _check_qkv(q, k, v):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v: expected three (B, N, D) tensors of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         sources: Sequence[Sequence[int]],
                         token_masks: Optional[torch.Tensor] = None,
                         bank: Optional[Sequence[Optional[tuple]]] = None,
                         window: int = 4) -> torch.Tensor:
    """Consistent self-attention, tiled over the batch.

    q, k, v: (B, N, D) projected tokens of B images.
    sources: length B; ``sources[b]`` lists batch rows ``j != b`` whose shared tokens row
        ``b`` attends to besides its own.
    token_masks: (B, N) bool, the tokens row ``j`` shares when it is a source; None = all.
    bank: None or length B of None / ``(K (M, D), V (M, D))``: extra tokens kept from an
        earlier pass, attended by row ``b`` as well.
    window: rows attended at once (peak memory ~ window * heads * N * (N + extra)).

    Row ``b`` attends to ``cat[bank_b, shared tokens of sources[b] (in order), own tokens]``.
    Returns (B, N, D).
    """
    _check_qkv(q, k, v)
    b_total, n, d = q.shape
    if len(sources) != b_total:
        raise ValueError(f"sources: {len(sources)} entries for a batch of {b_total} rows")
    if bank is not None and len(bank) != b_total:
        raise ValueError(f"bank: {len(bank)} entries for a batch of {b_total} rows")
    if token_masks is not None and tuple(token_masks.shape) != (b_total, n):
        raise ValueError(f"token_masks: expected ({b_total}, {n}), got {tuple(token_masks.shape)}")
    window = max(int(window), 1)
    # row indices of shared tokens, computed once per source row
    shared_idx: dict[int, torch.Tensor] = {}

    def shared(t: torch.Tensor, j: int) -> torch.Tensor:
        if token_masks is None:
            return t[j]
        if j not in shared_idx:
            shared_idx[j] = token_masks[j].nonzero().squeeze(1).to(t.device)
        return t[j].index_select(0, shared_idx[j])

    out = torch.empty_like(q)
    for start in range(0, b_total, window):
        stop = min(start + window, b_total)
        plain = all(len(sources[r]) == 0 and (bank is None or bank[r] is None) for r in range(start, stop))
        if plain:
            out[start:stop] = attention(q[start:stop], k[start:stop], v[start:stop], heads)
            continue
        ks, vs = [], []
        for r in range(start, stop):
            pk, pv = [], []
            if bank is not None and bank[r] is not None:
                pk.append(bank[r][0].to(k.device, k.dtype))
                pv.append(bank[r][1].to(v.device, v.dtype))
            for j in sources[r]:
                if j == r or not 0 <= j < b_total:
                    raise ValueError(f"sources: row {r} lists invalid source row {j}")
                pk.append(shared(k, j))
                pv.append(shared(v, j))
            pk.append(k[r])
            pv.append(v[r])
            ks.append(torch.cat(pk) if len(pk) > 1 else pk[0])
            vs.append(torch.cat(pv) if len(pv) > 1 else pv[0])
        lengths = [t.shape[0] for t in ks]
        longest = max(lengths)
        mask = None
        if min(lengths) != longest:
            # pad to one length; padded keys are masked out
            mask = torch.zeros(len(ks), 1, 1, longest, dtype=torch.bool, device=q.device)
            for i, length in enumerate(lengths):
                mask[i, ..., :length] = True
                if length < longest:
                    pad = longest - length
                    ks[i] = torch.cat([ks[i], ks[i].new_zeros(pad, d)])
                    vs[i] = torch.cat([vs[i], vs[i].new_zeros(pad, d)])
        out[start:stop] = attention(q[start:stop], torch.stack(ks), torch.stack(vs), heads, mask)
    return out


def consistent_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                               sources: Sequence[Sequence[int]],
                               token_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same maths as :func:`consistent_attention`, untiled: one joint attention over
    all ``B * N`` tokens with a (B*N, B*N) block mask. Memory grows with B squared.

    q, k, v: (B, N, D); sources, token_masks as in :func:`consistent_attention`.
    Returns (B, N, D).
    """
    _check_qkv(q, k, v)
    b, n, d = q.shape
    if token_masks is None:
        token_masks = torch.ones(b, n, dtype=torch.bool, device=q.device)
    token_masks = token_masks.to(q.device)
    rows = torch.zeros(b, b * n, dtype=torch.bool, device=q.device)
    for r in range(b):
        rows[r, r * n:(r + 1) * n] = True
        for j in sources[r]:
            rows[r, j * n:(j + 1) * n] = token_masks[j]
    mask = rows.repeat_interleave(n, dim=0)  # (B*N, B*N)
    out = attention(q.reshape(1, b * n, d), k.reshape(1, b * n, d), v.reshape(1, b * n, d), heads, mask)
    return out.view(b, n, d)


# ----------------------------------------------------------------------------- run state

def _seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class StoryLayout:
    """Who is in which panel.

    panel_characters: per panel, the names of the characters in it (empty = no character).
    references: per character, its reference (write-phase) panels in ascending order.
    """
    panel_characters: list
    references: dict = field(default_factory=dict)

    def __post_init__(self):
        self.panel_characters = [tuple(c) for c in self.panel_characters]
        self.references = {c: sorted(p) for c, p in self.references.items()}
        n = len(self.panel_characters)
        self.reference_of: dict[int, str] = {}
        for name, panels in self.references.items():
            if not panels:
                raise ValueError(f"references: character '{name}' has no reference panel")
            for p in panels:
                if not 0 <= p < n:
                    raise ValueError(f"references: panel {p} of '{name}' is outside the {n} panels")
                if p in self.reference_of:
                    raise ValueError(f"references: panel {p} is a reference of both "
                                     f"'{self.reference_of[p]}' and '{name}'")
                self.reference_of[p] = name
        for p, chars in enumerate(self.panel_characters):
            for c in chars:
                if c not in self.references:
                    raise ValueError(f"panel {p + 1}: character '{c}' has no reference panels")

    @property
    def n_panels(self) -> int:
        return len(self.panel_characters)

    @property
    def reference_panels(self) -> list:
        return sorted(self.reference_of)


class ConsistentSelfAttention:
    """State of consistent self-attention for one story run.

    Call :meth:`set_step` before each UNet evaluation, then every patched self-attention
    layer calls :meth:`attend`. One object serves one run; :meth:`reset` starts another.

    sa32 / sa64: sampling rate of the coarsest attention level (tokens at 1/32 of the image
        size, SDXL's 32x32 level at 1024 px) and of every finer level.
    schedule: ``"lowvram"`` (plain at step 0; later steps consistent with probability 0.7
        below step 20 and 0.9 from step 20; bank written at every step) or ``"app"``
        (references plain below step 5 while later panels attend to all reference tokens;
        gated like ``"lowvram"`` from step 5).
    keep_bank: store the sampled reference keys/values per (step, layer, character, chunk)
        so that later passes without the reference panels can read them; stored on
        ``bank_device`` (default: where they were computed). A chunk is one CFG half: later
        passes read what the same half wrote, whether the halves come batched or one by one.
    mask_sampler(step, n_tokens, panels, rate) -> (len(panels), n_tokens) bool and
    gate_sampler(step, layer, unit) -> bool replace the seeded draws (for tests).
    """

    def __init__(self, layout: StoryLayout, *, sa32: float = 0.5, sa64: float = 0.5, seed: int = 0,
                 schedule: str = "lowvram", window: int = 4, keep_bank: bool = False,
                 bank_device: Optional[torch.device] = None,
                 mask_sampler: Optional[Callable] = None, gate_sampler: Optional[Callable] = None):
        for name, rate in (("sa32", sa32), ("sa64", sa64)):
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(f"{name}: sampling rate {rate} is outside [0, 1]")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: '{schedule}' is not one of {SCHEDULES}")
        self.layout = layout
        self.sa32 = float(sa32)
        self.sa64 = float(sa64)
        self.seed = int(seed)
        self.schedule = schedule
        self.window = max(int(window), 1)
        self.keep_bank = keep_bank
        self.bank_device = bank_device
        self.mask_sampler = mask_sampler
        self.gate_sampler = gate_sampler
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.latent_hw: Optional[tuple] = None
        self._layers: dict[Hashable, int] = {}
        self._masks: dict[int, dict[int, torch.Tensor]] = {}
        self.bank: dict[tuple, tuple] = {}

    # -- per step
    def set_step(self, step: int) -> None:
        step = int(step)
        if step != self.step:
            self._masks = {}
        self.step = step

    def rate_for(self, n_tokens: int) -> float:
        """sa32 for the coarsest level (1/4 of the latent size per side), else sa64."""
        if self.latent_hw is None:
            return self.sa64
        h, w = self.latent_hw
        coarse = ((h + 3) // 4) * ((w + 3) // 4)
        return self.sa32 if n_tokens <= coarse else self.sa64

    def _layer(self, key: Hashable) -> int:
        if key not in self._layers:
            self._layers[key] = len(self._layers)
        return self._layers[key]

    def token_masks(self, n_tokens: int) -> dict:
        """panel -> (n_tokens,) bool: the tokens each reference panel shares at this step."""
        if n_tokens not in self._masks:
            panels = self.layout.reference_panels
            rate = self.rate_for(n_tokens)
            if self.mask_sampler is not None:
                drawn = self.mask_sampler(self.step, n_tokens, panels, rate)
            elif panels:
                gen = torch.Generator().manual_seed(_seed("tokens", self.seed, self.step, n_tokens))
                drawn = torch.rand(len(panels), n_tokens, generator=gen) < rate
            else:
                drawn = torch.zeros(0, n_tokens, dtype=torch.bool)
            drawn = torch.as_tensor(drawn, dtype=torch.bool)
            if tuple(drawn.shape) != (len(panels), n_tokens):
                raise ValueError(f"mask_sampler: expected ({len(panels)}, {n_tokens}), got {tuple(drawn.shape)}")
            self._masks[n_tokens] = {p: drawn[i] for i, p in enumerate(panels)}
        return self._masks[n_tokens]

    def _gate(self, layer: int, unit: tuple) -> bool:
        """Whether the consistent branch runs for a unit (a character's references or one
        later panel) at this step and layer."""
        if self.gate_sampler is not None:
            return bool(self.gate_sampler(self.step, layer, unit))
        threshold = 0.3 if self.step < 20 else 0.1
        gen = torch.Generator().manual_seed(_seed("gate", self.seed, self.step, layer, unit))
        return float(torch.rand((), generator=gen)) > threshold

    def _modes(self, layer: int, unit: tuple, write: bool) -> tuple:
        """(consistent?, all reference tokens?) for a unit at this step."""
        if self.schedule == "lowvram":
            if self.step < 1:
                return False, False
            return self._gate(layer, unit), False
        if self.step < 5:
            return (False, False) if write else (True, True)
        return self._gate(layer, unit), False

    # -- the attention call
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layer: Hashable,
               panels: Sequence[int], groups: int = 1, chunks: Optional[Sequence[Hashable]] = None) -> torch.Tensor:
        """Consistent self-attention of one layer.

        q, k, v: (groups * P, N, D) projected tokens; rows ordered group-major (one CFG
        half after the other), each group holding ``panels`` (P story panel indices) in
        order. layer: a stable key of the layer. chunks: what each group is (e.g. ComfyUI's
        ``cond_or_uncond``), the key under which its bank is kept; default 0, 1, ...
        Returns (groups * P, N, D).
        """
        _check_qkv(q, k, v)
        panels = [int(p) for p in panels]
        n_rows, n, _ = q.shape
        if groups < 1 or n_rows != groups * len(panels):
            raise ValueError(f"batch: {n_rows} rows are not {groups} groups of {len(panels)} panels")
        chunks = list(range(groups)) if chunks is None else list(chunks)
        if len(chunks) != groups:
            raise ValueError(f"chunks: {len(chunks)} names for {groups} groups")
        layout = self.layout
        for p in panels:
            if not 0 <= p < layout.n_panels:
                raise ValueError(f"panels: panel {p} is outside the story's {layout.n_panels} panels")
        li = self._layer(layer)
        pos = {p: i for i, p in enumerate(panels)}
        masks = self.token_masks(n)
        per_panel = len(panels)

        present = {}
        for name, refs in layout.references.items():
            inside = [p for p in refs if p in pos]
            if inside and len(inside) != len(refs):
                raise ValueError(f"batch: character '{name}' has reference panels {refs} but only "
                                 f"{inside} are in this batch; keep a character's references together")
            present[name] = bool(inside)

        # the sampled tokens each reference panel shares, and the full masks for early reads
        shared = {p: masks[p] for p in panels if p in layout.reference_of}
        token_masks = torch.ones(n_rows, n, dtype=torch.bool)
        for p, m in shared.items():
            for g in range(groups):
                token_masks[g * per_panel + pos[p]] = m
        full_rows = set()

        sources: list = [[] for _ in range(n_rows)]
        bank_rows: list = [None] * n_rows
        use_bank = False
        for i, p in enumerate(panels):
            if p in layout.reference_of:
                name = layout.reference_of[p]
                on, _ = self._modes(li, ("ref", name), write=True)
                if on:
                    for g in range(groups):
                        sources[g * per_panel + i] = [g * per_panel + pos[r] for r in layout.references[name]
                                                      if r != p]
                continue
            chars = layout.panel_characters[p]
            if not chars:
                continue
            on, everything = self._modes(li, ("panel", p), write=False)
            if not on:
                continue
            for g in range(groups):
                row = g * per_panel + i
                bank_k, bank_v = [], []
                for name in chars:
                    if present[name]:
                        for r in layout.references[name]:
                            sources[row].append(g * per_panel + pos[r])
                            if everything:
                                full_rows.add(g * per_panel + pos[r])
                    else:
                        stored = self.bank.get((self.step, li, name, chunks[g]))
                        if stored is None:
                            raise ValueError(
                                f"batch: panel {p + 1} names '{name}' but neither its reference panels "
                                f"nor their bank for step {self.step} (guidance half {chunks[g]}) are "
                                f"available; run the reference panels first with keep_bank=True and the "
                                f"same guidance")
                        bank_k.append(stored[0])
                        bank_v.append(stored[1])
                if bank_k:
                    bank_rows[row] = (torch.cat(bank_k), torch.cat(bank_v))
                    use_bank = True

        # early reads of the "app" schedule see every reference token
        if full_rows:
            if any(sources[r] for r in full_rows):
                # references writing consistently while being read in full cannot share one mask
                raise ValueError("schedule: mixed full and sampled reference tokens in one batch")
            for r in full_rows:
                token_masks[r] = True

        if self.keep_bank:
            self._store_bank(k, v, li, panels, chunks, present, shared)

        return consistent_attention(q, k, v, heads, sources, token_masks.to(q.device),
                                    bank_rows if use_bank else None, self.window)

    def _store_bank(self, k, v, li, panels, chunks, present, shared):
        pos = {p: i for i, p in enumerate(panels)}
        per_panel = len(panels)
        everything = self.schedule == "app" and self.step < 5
        dev = self.bank_device or k.device
        for name, here in present.items():
            if not here:
                continue
            for g, chunk in enumerate(chunks):
                gk, gv = [], []
                for r in self.layout.references[name]:
                    row = g * per_panel + pos[r]
                    if everything:
                        gk.append(k[row])
                        gv.append(v[row])
                    else:
                        idx = shared[r].nonzero().squeeze(1).to(k.device)
                        gk.append(k[row].index_select(0, idx))
                        gv.append(v[row].index_select(0, idx))
                self.bank[(self.step, li, name, chunk)] = (torch.cat(gk).to(dev), torch.cat(gv).to(dev))
