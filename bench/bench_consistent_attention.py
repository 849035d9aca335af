"""Benchmark: consistent self-attention against plain attention on the same batches.

One attention layer at SDXL's 64x64 up level (4096 tokens, 640 channels, 10 heads of 64), a
story of ``--panels`` panels with one character and ``--id-length`` reference panels, sampling
rate 0.5, classifier-free guidance (every batch holds both halves), bf16, 1 torch thread.

Routes, each a sequence of batches as the sampler sends them to one layer at one step:

- ``phases``: the Story Batch node and the pipeline: the references first (written to the
  bank), then the other panels ``--batch-size`` at a time, reading the bank
  (``NativeConsistentAttention`` with a shared state, as on ComfyUI's UNet);
- ``one batch``: the whole story as one latent batch under ComfyUI's KSampler (the
  Consistent Attention Patch: ``NativeConsistentAttention`` without a shared state).

Each batch runs ``--repeats`` times (median time, largest memory). For each batch the plain
reference is ``scaled_dot_product_attention`` on the same q, k, v (what
diffusers' processor runs; ComfyUI's default CPU attention, sub-quadratic, is slower and takes
more memory). The two run interleaved in one process. Time: CPU seconds of this thread. Working
memory: the peak resident set during the call above the one before it (the output included; the
kernel's peak is reset before each call through /proc/self/clear_refs; the script runs itself
with ``MALLOC_MMAP_THRESHOLD_`` set so that freed tensors leave the resident set). The bank the reference
phase keeps for later phases (state, not working memory) is reported on its own and left out of
its working memory. Every consistent unit runs (gates on): the costliest step. Over the default
35-step "lowvram" schedule about 77 % of units run, so a run's attention costs about
``1 + 0.77 * (ratio - 1)`` times plain; that figure is printed too.

The least work: attention's work is proportional to the keys each query attends to, and every
row of consistent attention attends to its own N tokens plus the sampled reference tokens
(a later panel: every reference's, about N more with 2 references at rate 0.5). ``keys x`` is
that count over plain attention's, from the batch's own sampled tokens; ``one call x`` times
one ``scaled_dot_product_attention`` call over that many keys (the fastest any exact form can
be on this kernel, the form the official code takes), against the same plain reference.

    python bench/bench_consistent_attention.py [--panels 16] [--id-length 2] [--batch-size 2]
        [--flat 4 8 16] [--heads-frac 1.0] [--dtype bf16] [--threads 1] [--repeats 3]

``--flat`` repeats the one-batch route at these panel counts: the working memory beyond plain
attention's must not grow with them. ``--heads-frac`` < 1 keeps the token count and head size
but fewer heads (time and memory scale about linearly with the heads), for a quick run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _pack import load_average, load_pack

N_TOKENS, CHANNELS, HEADS = 4096, 640, 10  # SDXL's 64x64 up level at 1024 px
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(fn):
    """(result, CPU seconds, working memory MiB): the peak RSS during ``fn`` above the RSS before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    before = _rss_mib()
    t0 = time.thread_time()
    out = fn()
    dt = time.thread_time() - t0
    return out, dt, _hwm_mib() - before


def _bank_mib(state) -> float:
    return sum(t.numel() * t.element_size() for kv in state.bank.values() for t in kv) / 2 ** 20


class Route:
    """Sums of plain and consistent time and memory over one route's batches."""

    def __init__(self, name):
        self.name = name
        self.rows = []

    def add(self, what, rows, plain, consistent, bank_mib, keys, one_call):
        """plain / consistent: (seconds, MiB); keys: keys attended over plain's; one_call: seconds."""
        self.rows.append((what, rows, plain, consistent, bank_mib, keys, one_call))

    def print(self):
        print(f"-- {self.name}")
        print(f"   {'batch':<22} {'rows':>4} | {'plain s':>8} {'MiB':>6} | {'consistent s':>12} {'MiB':>6} "
              f"{'bank MiB':>8} | {'time x':>6} {'keys x':>6} {'one call x':>10} {'mem x':>6}")
        tp = tc = tk = t1 = 0.0
        worst = 0.0
        for what, rows, (t_p, m_p), (t_c, m_c), bank, keys, one_call in self.rows:
            tp, tc, tk, t1 = tp + t_p, tc + t_c, tk + t_p * keys, t1 + one_call
            mem = (m_c - bank) / max(m_p, 1e-9)
            worst = max(worst, mem)
            print(f"   {what:<22} {rows:>4} | {t_p:>8.2f} {m_p:>6.0f} | {t_c:>12.2f} {m_c:>6.0f} {bank:>8.1f} | "
                  f"{t_c / t_p:>6.2f} {keys:>6.2f} {one_call / t_p:>10.2f} {mem:>6.2f}")
        ratio, keys, one_call = tc / tp, tk / tp, t1 / tp
        print(f"   all batches: time {ratio:.2f}x plain with every unit on (keys attended {keys:.2f}x plain's; "
              f"one call over them {one_call:.2f}x), about {1 + 0.77 * (ratio - 1):.2f}x over a 35-step lowvram run "
              f"(keys {1 + 0.77 * (keys - 1):.2f}x); working memory at most {worst:.2f}x plain (bank left out)")
        return ratio, worst


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # every block over 128 KiB mapped on its own and returned when freed, so the resident set
        # follows the live tensors (glibc otherwise keeps freed blocks for reuse)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--panels", type=int, default=16)
    ap.add_argument("--id-length", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="later panels per phase (the Story Batch default)")
    ap.add_argument("--flat", type=int, nargs="*", default=[4, 8, 16],
                    help="panel counts for the one-batch memory comparison")
    ap.add_argument("--heads-frac", type=float, default=1.0)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each batch (median time, largest memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_pack()
    from kinema.kernels.attention import multihead_attention as attention
    from kinema.kernels.consistent_attention import ConsistentSelfAttention, StoryLayout
    from kinema.pipelines.story import NativeConsistentAttention

    dt = DTYPES[args.dtype]
    heads = max(1, round(HEADS * args.heads_frac))
    d = heads * 64
    gen = torch.Generator().manual_seed(0)
    ConsistentSelfAttention._gate = lambda self, layer, unit: True  # every consistent unit runs

    def layout(p):
        refs = list(range(args.id_length))
        return StoryLayout([("A",)] * p, {"A": refs})

    def qkv(rows):
        return tuple((torch.randn(rows, N_TOKENS, d, generator=gen) * 0.5).to(dt) for _ in range(3))

    def options(rows):
        return {"cond_or_uncond": [1, 0], "n_heads": heads, "sigmas": torch.tensor([5.0]),
                "sample_sigmas": torch.tensor([10.0, 5.0, 1.0, 0.0]), "original_shape": [rows, 4, 128, 128],
                "block": ("output", 3), "block_index": 0}

    def compare(route, what, patch, q, k, v, bank_before=None):
        """Plain and consistent attention on one batch, interleaved ``--repeats`` times: the median
        time and the largest working memory of each (a repeat rewrites the same bank entries)."""
        runs = {"plain": [], "consistent": [], "one call": []}
        wide = keys = None
        for _ in range(args.repeats):
            runs["plain"].append(_measure(lambda: attention(q, k, v, heads)))
            runs["consistent"].append(_measure(lambda: patch(q, k, v, options(q.shape[0]))))
            if wide is None:  # as many keys as the rows attend to (known once the patch has drawn them)
                keys = keys_ratio(patch)
                m = round(keys * N_TOKENS)
                reps = -(-m // N_TOKENS)
                wide = (torch.cat([k] * reps, 1)[:, :m], torch.cat([v] * reps, 1)[:, :m])
            runs["one call"].append(_measure(lambda: attention(q, wide[0], wide[1], heads)))
        del wide
        bank = 0.0
        if bank_before is not None:
            bank = _bank_mib(patch.state) - bank_before
        err = float((runs["consistent"][0][0].float() - runs["plain"][0][0].float()).abs().max())
        assert err > 0, "consistent attention changed nothing"
        summary = {key: (statistics.median(r[1] for r in rs), max(r[2] for r in rs)) for key, rs in runs.items()}
        route.add(what, q.shape[0], summary["plain"], summary["consistent"], bank, keys, summary["one call"][0])

    def keys_ratio(patch):
        """Keys the batch's rows attend to over plain attention's (rows x N): a reference panel
        reads the other references' sampled tokens, a later panel all of them. Attention's work
        is proportional to the keys, so no exact method can take less time than this ratio."""
        shared = {r: int(m.sum()) for r, m in patch.state.token_masks(N_TOKENS).items()}  # this step's draw
        refs = patch.layout.references["A"]
        keys = sum(N_TOKENS + sum(shared[r] for r in refs if r != p) for p in patch.panels)
        return keys / (len(patch.panels) * N_TOKENS)

    print(f"consistent attention vs plain attention: {N_TOKENS} tokens, {d} channels, {heads} heads, "
          f"{args.dtype}, {torch.get_num_threads()} thread(s), {args.id_length} reference panels, rate 0.5, "
          f"CFG; CPU seconds, working memory in MiB")
    print(f"load average before: {load_average()}")
    with torch.no_grad():
        lay = layout(args.panels)
        # warm-up: every kernel both forms use runs once (their code paged in, thread buffers made)
        warm = ConsistentSelfAttention(lay, keep_bank=True)
        refs = list(range(args.id_length))
        for panels in (refs, [args.id_length]):
            q, k, v = qkv(2 * len(panels))
            attention(q, k, v, heads)
            NativeConsistentAttention(lay, state=warm, panels=panels)(q, k, v, options(q.shape[0]))
        del warm
        # phases: the references (bank written), then the other panels batch_size at a time
        phases = Route(f"phases: {args.panels} panels, references then {args.batch_size} at a time")
        state = ConsistentSelfAttention(lay, keep_bank=True)
        state.latent_hw = (128, 128)
        rest = [p for p in range(args.panels) if p not in refs]
        for panels in [refs] + [rest[i:i + args.batch_size] for i in range(0, len(rest), args.batch_size)]:
            patch = NativeConsistentAttention(lay, state=state, panels=panels)
            q, k, v = qkv(2 * len(panels))
            what = "references (write)" if panels == refs else f"panels {panels[0] + 1}-{panels[-1] + 1} (read)"
            compare(phases, what, patch, q, k, v, bank_before=_bank_mib(state))
        phases.print()
        if not args.flat:
            print(f"load average after:  {load_average()}")
            return
        # the whole story in one batch (KSampler with the patch), at several panel counts
        flat = Route("one batch: the whole story in one latent batch (Consistent Attention Patch)")
        for p in args.flat:
            patch = NativeConsistentAttention(layout(p))
            q, k, v = qkv(2 * p)
            compare(flat, f"{p} panels", patch, q, k, v)
        flat.print()
        extra = [(m_c - m_p) for _, _, (_, m_p), (_, m_c), *_ in flat.rows]
        print(f"   memory beyond plain attention's at {', '.join(map(str, args.flat))} panels: "
              f"{', '.join(f'{e:.0f}' for e in extra)} MiB")
    print(f"load average after:  {load_average()}")


if __name__ == "__main__":
    main()
