"""Extraction speed: stopping the forward after the hooked layer vs running the whole model.

Loads the embedded SmolLM2-135M (30 layers), packs the built-in "stdlib" corpus (or --text) into contexts and
extracts ``layers.15.resid_post`` two ways on the same batches:

* early stop: ``saekit.models.forward_to_hooks`` (layers 16-29, the final norm and the unembedding never run);
* full forward: ``model(input_ids, output_hidden_states=True)``, the usual way, reading ``hidden_states[16]``.

The two are timed batch by batch, alternating, so that load from other processes on a shared machine hits
both alike; the activations of the two paths are compared as a correctness check. Prints tokens/s of each
and their ratio (target: >= 1.6x).

    python benchmarks/extract.py [--tokens 8192] [--hook layers.15.resid_post] [--text stdlib]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch

from saekit.data import iter_texts, pack_contexts
from saekit.models import forward_to_hooks, hook_layer, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens to extract per method (default 8192)")
    ap.add_argument(
        "--hook", default="layers.15.resid_post", help="hook point (default layers.15.resid_post)"
    )
    ap.add_argument("--text", default="stdlib", help="text source: 'stdlib', a file/folder, or hf:NAME")
    ap.add_argument("--context-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="contexts per forward")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    loaded = load_model("smollm2")
    model = loaded.model
    took = time.perf_counter() - t0
    print(f"loaded {loaded.name} ({loaded.n_layers} layers, d={loaded.d_model}) in {took:.1f} s")
    layer = hook_layer(model, args.hook)
    if not args.hook.endswith(".resid_post"):
        raise SystemExit(
            "the full-forward comparison reads hidden_states, so --hook must be a resid_post point"
        )

    n_ctx = math.ceil(args.tokens / args.context_len)
    contexts = list(
        itertools.islice(pack_contexts(iter_texts(args.text), loaded.tokenizer, args.context_len), n_ctx)
    )
    if len(contexts) < n_ctx:
        print(f"note: the text gives only {len(contexts)} contexts of {args.context_len} tokens")
    batches = [
        torch.stack(contexts[i : i + args.batch_size]) for i in range(0, len(contexts), args.batch_size)
    ]
    n_tokens = sum(b.numel() for b in batches)
    print(
        f"{n_tokens:,} tokens = {len(batches)} batches of {args.batch_size} x {args.context_len}, "
        f"hook {args.hook}, {torch.get_num_threads()} threads"
    )

    def early(ids: torch.Tensor) -> torch.Tensor:
        return forward_to_hooks(model, ids, [args.hook])[args.hook]

    def full(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]

    early(batches[0][:1])  # warm-up (first-call allocations)
    full(batches[0][:1])
    t_early = t_full = 0.0
    max_diff = 0.0
    for ids in batches:
        t = time.perf_counter()
        a = early(ids)
        t_early += time.perf_counter() - t
        t = time.perf_counter()
        b = full(ids)
        t_full += time.perf_counter() - t
        max_diff = max(max_diff, float((a - b).abs().max() / b.abs().max()))
    r_early, r_full = n_tokens / t_early, n_tokens / t_full
    rows = [
        (f"early stop (layers 0-{layer}, forward_to_hooks)", r_early, t_early),
        (f"full forward ({loaded.n_layers} layers + unembedding)", r_full, t_full),
    ]
    print()
    for label, rate, secs in rows:
        print(f"  {label:<45} {rate:8.0f} tokens/s  ({secs:.1f} s)")
    print(f"  {'speed-up':<45} {r_early / r_full:8.2f}x         (target >= 1.6x)")
    print(f"  {'max relative difference of the activations':<45} {max_diff:8.1e}")


if __name__ == "__main__":
    main()
