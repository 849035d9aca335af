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

Time and memory (:func:`attention_with_extra_keys`): every row first attends to its own tokens
in one call over the whole batch - exactly plain self-attention, which also gives each query's
log-sum-exp - and then, a slice of queries at a time, to each extra key block (sampled reference
tokens, a bank entry), merged into the output with the log-sum-exps (one softmax over all keys,
as if the keys were concatenated). Nothing is concatenated, padded or masked, and the reference
tokens are gathered once per call however many panels read them (or read from the bank in place),
so the working memory is plain attention's plus one block and one slice, whatever the number of
panels. :func:`consistent_attention_dense` is the straightforward untiled form of the same maths
(one joint attention over the whole batch with a block mask), kept as the reference for tests.

:class:`ConsistentSelfAttention` holds the state of one story run (step, sampled token
masks, gates, bank); nothing lives in module globals.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch

from .attention import check_heads, merge_heads, multihead_attention, split_heads

__all__ = [
    "attention_with_extra_keys",
    "consistent_attention",
    "consistent_attention_dense",
    "StoryLayout",
    "ConsistentSelfAttention",
    "SCHEDULES",
]

SCHEDULES = ("lowvram", "app")


def _check_qkv(q, k, v):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v: expected three (B, N, D) tensors of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


Block = tuple  # (K (M, D), V (M, D)): extra keys and values one row attends to


def _with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    """Multi-head attention that also returns each query's log-sum-exp of its scores: q (B, Nq, D),
    k/v (B, Nk, D) -> out (B, Nq, D), lse (B, Nq, heads) float32 (torch's CPU flash kernel, the
    one that returns it)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return merge_heads(out), lse.transpose(1, 2)


def _merge_in_place(q: torch.Tensor) -> bool:
    """Whether the log-sum-exp merge can run: torch's CPU flash kernel, no autograd."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and not (torch.is_grad_enabled() and q.requires_grad))


def attention_with_extra_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              extras: Sequence[Sequence], query_chunk: Optional[int] = None) -> torch.Tensor:
    """Self-attention where row ``b`` also attends to extra key/value blocks.

    q, k, v: (B, N, D); extras: length B, ``extras[b]`` a list of blocks, each ``(K (M, D),
    V (M, D))`` on q's device and dtype, or a function making that pair (called once, when
    the block is first needed, and dropped after its last row; rows share a block by listing
    the same object). Row b's queries take one softmax over its own N keys and every block's
    keys. Returns (B, N, D).

    On the CPU: the own-token attention of all rows in one call (plain attention, plus its
    log-sum-exp), then block by block, for each row listing it, ``query_chunk`` queries at a
    time (default: 512, or more for narrow tokens: about 2^18 numbers of output), attention to
    the block merged into the output with the log-sum-exps. No keys are concatenated: the memory
    beyond plain attention is one block, one chunk and the (B, N, heads) log-sum-exps. Elsewhere
    each row with blocks attends to its keys concatenated.
    """
    _check_qkv(q, k, v)
    b_total, n, d = q.shape
    if len(extras) != b_total:
        raise ValueError(f"extras: {len(extras)} entries for a batch of {b_total} rows")
    check_heads(d, heads, "heads")
    order: dict = {}  # id(block) -> (block, rows reading it), in first-use order
    for r, blocks in enumerate(extras):
        for block in blocks:
            order.setdefault(id(block), (block, []))[1].append(r)

    def made(block) -> Block:
        return block() if callable(block) else block

    if not _merge_in_place(q):
        out = multihead_attention(q, k, v, heads)
        built = {key: made(block) for key, (block, _rows) in order.items()}
        for r, blocks in enumerate(extras):
            pairs = [built[id(b)] for b in blocks]
            if any(kx.shape[0] for kx, _ in pairs):
                keys = torch.cat([kx for kx, _ in pairs] + [k[r]])[None]
                values = torch.cat([vx for _, vx in pairs] + [v[r]])[None]
                out[r] = multihead_attention(q[r:r + 1], keys, values, heads)[0]
        return out
    out, lse = _with_lse(q, k, v, heads)  # (B, N, D), (B, N, heads): plain attention
    chunk = max(1, int(query_chunk or max(512, (1 << 18) // d)))
    hd = d // heads
    for block, rows in order.values():
        kx, vx = made(block)
        if not kx.shape[0]:
            continue
        for r in rows:
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                ox, lx = _with_lse(q[r:r + 1, start:stop], kx[None], vx[None], heads)
                lo = lse[r, start:stop]                                   # (c, heads) float32
                total = torch.logaddexp(lo, lx[0])
                o = out[r, start:stop].view(stop - start, heads, hd)
                # weights in the output's dtype: no float32 copies of the slice
                o.mul_(torch.exp(lo - total).to(o.dtype)[..., None])
                o.addcmul_(ox[0].view(stop - start, heads, hd), torch.exp(lx[0] - total).to(o.dtype)[..., None])
                lo.copy_(total)
        del kx, vx
    return out


def consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         sources: Sequence[Sequence[int]],
                         token_masks: Optional[torch.Tensor] = None,
                         bank: Optional[Sequence[Optional[tuple]]] = None) -> torch.Tensor:
    """Consistent self-attention of a batch given who reads whom.

    q, k, v: (B, N, D) projected tokens of B images.
    sources: length B; ``sources[b]`` lists batch rows ``j != b`` whose shared tokens row
        ``b`` attends to besides its own.
    token_masks: (B, N) bool, the tokens row ``j`` shares when it is a source; None = all.
    bank: None or length B of None / ``(K (M, D), V (M, D))`` / a list of such pairs: extra
        tokens kept from an earlier pass, attended by row ``b`` as well.

    Row ``b`` attends to ``cat[bank_b, shared tokens of sources[b] (in order), own tokens]``
    (one softmax; see :func:`attention_with_extra_keys`). A source's shared tokens are gathered
    once, however many rows read them, and only while they are read. Returns (B, N, D).
    """
    _check_qkv(q, k, v)
    b_total, n, d = q.shape
    if len(sources) != b_total:
        raise ValueError(f"sources: {len(sources)} entries for a batch of {b_total} rows")
    if bank is not None and len(bank) != b_total:
        raise ValueError(f"bank: {len(bank)} entries for a batch of {b_total} rows")
    if token_masks is not None and tuple(token_masks.shape) != (b_total, n):
        raise ValueError(f"token_masks: expected ({b_total}, {n}), got {tuple(token_masks.shape)}")
    shared: dict = {}
    moved: dict[int, torch.Tensor] = {}

    def here(t: torch.Tensor) -> torch.Tensor:  # a bank tensor on q's device and dtype, moved once
        if id(t) not in moved:
            moved[id(t)] = t.to(q.device, q.dtype)
        return moved[id(t)]

    def source(j: int):
        if token_masks is None:
            return k[j], v[j]
        idx = token_masks[j].nonzero().squeeze(1).to(q.device)
        return lambda: (k[j].index_select(0, idx), v[j].index_select(0, idx))  # gathered when needed

    extras = []
    for r in range(b_total):
        blocks = []
        if bank is not None and bank[r] is not None:
            entry = bank[r]
            for kx, vx in ([entry] if isinstance(entry, tuple) else entry):
                blocks.append((here(kx), here(vx)))
        for j in sources[r]:
            if j == r or not 0 <= j < b_total:
                raise ValueError(f"sources: row {r} lists invalid source row {j}")
            if j not in shared:
                shared[j] = source(j)
            blocks.append(shared[j])
        extras.append(blocks)
    return attention_with_extra_keys(q, k, v, heads, extras)


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
    out = multihead_attention(q.reshape(1, b * n, d), k.reshape(1, b * n, d), v.reshape(1, b * n, d), heads, mask)
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
                 schedule: str = "lowvram", keep_bank: bool = False,
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

        The shared tokens of a character's references are gathered once per group into one
        (K, V) pair (the bank entry); reference panels read slices of it, later panels all of
        it (or the bank's), without copies per panel.
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
        for name, refs in layout.references.items():
            inside = [p for p in refs if p in pos]
            if inside and len(inside) != len(refs):
                raise ValueError(f"batch: character '{name}' has reference panels {refs} but only "
                                 f"{inside} are in this batch; keep a character's references together")
        # the "app" schedule's early steps share every reference token, later ones the sampled
        everything = self.schedule == "app" and self.step < 5
        gathered: dict = {}

        def refs_of(name: str, g: int) -> tuple:
            """(K, V, offsets): the shared tokens of ``name``'s reference panels in group g,
            in reference order, gathered into one pair (the bank entry); offsets[i] is where
            reference i starts (plus the total)."""
            if (name, g) not in gathered:
                rows = [g * per_panel + pos[r] for r in layout.references[name]]
                idx = [None if everything else masks[r].nonzero().squeeze(1).to(k.device)
                       for r in layout.references[name]]
                sizes = [n if i is None else int(i.numel()) for i in idx]
                offsets = [0]
                for size in sizes:
                    offsets.append(offsets[-1] + size)
                kk = k.new_empty(offsets[-1], k.shape[-1])
                vv = v.new_empty(offsets[-1], v.shape[-1])
                for row, i, a, z in zip(rows, idx, offsets, offsets[1:]):
                    if i is None:
                        kk[a:z] = k[row]
                        vv[a:z] = v[row]
                    else:
                        torch.index_select(k[row], 0, i, out=kk[a:z])
                        torch.index_select(v[row], 0, i, out=vv[a:z])
                gathered[(name, g)] = (kk, vv, offsets)
            return gathered[(name, g)]

        blocks: dict = {}  # one object per distinct block: the rows reading it share it

        def block(key, make):
            if key not in blocks:
                blocks[key] = make()
            return blocks[key]

        def reference(r: int, g: int):
            """The shared tokens of reference panel r in group g: a slice of the bank entry when
            the bank keeps them, else gathered only while read (or the panel's own tokens)."""
            def make():
                name = layout.reference_of[r]
                if self.keep_bank:
                    kk, vv, off = refs_of(name, g)
                    i = layout.references[name].index(r)
                    return kk[off[i]:off[i + 1]], vv[off[i]:off[i + 1]]
                row = g * per_panel + pos[r]
                if everything:
                    return k[row], v[row]
                idx = masks[r].nonzero().squeeze(1).to(k.device)
                return lambda: (k[row].index_select(0, idx), v[row].index_select(0, idx))
            return block(("reference", r, g), make)

        def character(name: str, g: int, panel: int) -> list:
            """The blocks of everything a later panel reads of ``name`` in group g."""
            if layout.references[name][0] not in pos:
                return [block(("bank", name, g), lambda: banked(name, g, panel))]
            if self.keep_bank:
                return [block(("character", name, g), lambda: refs_of(name, g)[:2])]
            return [reference(r, g) for r in layout.references[name]]

        def banked(name: str, g: int, panel: int) -> Block:
            stored = self.bank.get((self.step, li, name, chunks[g]))
            if stored is None:
                raise ValueError(
                    f"batch: panel {panel + 1} names '{name}' but neither its reference panels "
                    f"nor their bank for step {self.step} (guidance half {chunks[g]}) are "
                    f"available; run the reference panels first with keep_bank=True and the "
                    f"same guidance")
            return stored[0].to(q.device, q.dtype), stored[1].to(q.device, q.dtype)

        extras: list = [[] for _ in range(n_rows)]
        for i, p in enumerate(panels):
            if p in layout.reference_of:
                name = layout.reference_of[p]
                on, _ = self._modes(li, ("ref", name), write=True)
                if on:
                    for g in range(groups):
                        extras[g * per_panel + i] = [reference(r, g) for r in layout.references[name] if r != p]
                continue
            chars = layout.panel_characters[p]
            if not chars or not self._modes(li, ("panel", p), write=False)[0]:
                continue
            for g in range(groups):
                extras[g * per_panel + i] = [b for name in chars for b in character(name, g, p)]

        if self.keep_bank:
            dev = self.bank_device or k.device
            for name, refs in layout.references.items():
                if refs[0] in pos:
                    for g, chunk in enumerate(chunks):
                        kk, vv, _ = refs_of(name, g)
                        self.bank[(self.step, li, name, chunk)] = (kk.to(dev), vv.to(dev))

        return attention_with_extra_keys(q, k, v, heads, extras)
