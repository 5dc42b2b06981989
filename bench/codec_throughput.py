"""Codec chain throughput on a 10M-value update, against a plain memory copy.

For a 10,000,000-value float32 vector (standard normal, so top-k positions are
spread out: the Elias–Fano case), each chain is timed end to end as a caller sees
it: ``chain.encode(x)`` (input checks, selection, quantisation, index coding,
zstd, CRC) and ``chain.decode(payload)`` back to a dense vector. Per chain:

* ``encode_s`` / ``decode_s``: medians over ``--repeats`` runs;
* ``payload_bytes`` and ``bytes_per_value`` (32 bits is 4.0);
* ``mb_per_s``: MB of input per second of encode + decode (40 MB / (enc + dec));
* ``vs_copy``: that throughput over the throughput of ``x.clone()`` (median of
  several) measured in the same process: 0.1 means encode + decode costs as much as
  ten memory copies of the update;
* ``vs_numpy_copy``: the same against ``np.copy`` of the tensor's buffer, a stricter
  baseline where torch's fresh 40 MB allocations are slowed by page faults (numpy
  asks for huge pages) — on some machines ``x.clone()`` is several times slower.

Chains run interleaved with the copies (copies, chain, copies, ...) so drift in
machine load hits all alike; the 1-minute load average before and after is recorded.
Not a test: numbers, not assertions. Writes ``bench/results/codec_throughput.json``.

    python bench/codec_throughput.py
    python bench/codec_throughput.py --numel 1000000 --repeats 3   # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fedbits.compress import parse_chain

RESULTS = Path(__file__).resolve().parent / "results"
CHAINS = [
    [],
    ["fp16"],
    ["int8"],
    ["topk:1/16"],
    ["topk:1/16", "int8", "zstd"],
    ["topk:1/64", "fp16"],
    ["randk:1/16", "fp16"],
]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other processes' share of the CPUs, for context
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    input_mb = x.numel() * 4 / 1e6
    gen = torch.Generator().manual_seed(1)
    copies: list[float] = []
    numpy_copies: list[float] = []
    rows = []
    for stages in CHAINS:
        chain = parse_chain(stages, field="bench")
        payload = chain.encode(x, generator=gen)  # warm-up, and the payload to decode
        encode, decode = [], []
        for _ in range(args.repeats):
            copies.append(seconds(x.clone))
            numpy_copies.append(seconds(x.numpy().copy))
            encode.append(seconds(partial(chain.encode, x, generator=gen)))
            decode.append(seconds(partial(chain.decode, payload, numel=args.numel, what="bench")))
        rows.append(
            {
                "chain": stages,
                "encode_s": statistics.median(encode),
                "decode_s": statistics.median(decode),
                "payload_bytes": len(payload),
                "bytes_per_value": len(payload) / args.numel,
            }
        )
        print(
            f"{' '.join(stages) or '(empty: fp32)':28s} {rows[-1]['encode_s']:.3f} s enc "
            f"{rows[-1]['decode_s']:.3f} s dec {len(payload):>10,d} B",
            flush=True,
        )

    copy_s = statistics.median(copies)
    numpy_copy_s = statistics.median(numpy_copies)
    for row in rows:
        row["mb_per_s"] = input_mb / (row["encode_s"] + row["decode_s"])
        row["vs_copy"] = copy_s / (row["encode_s"] + row["decode_s"])
        row["vs_numpy_copy"] = numpy_copy_s / (row["encode_s"] + row["decode_s"])
    out = {
        "numel": args.numel,
        "input_mb": input_mb,
        "repeats": args.repeats,
        "copy_s": copy_s,
        "copy_mb_per_s": input_mb / copy_s,
        "numpy_copy_s": numpy_copy_s,
        "numpy_copy_mb_per_s": input_mb / numpy_copy_s,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min": [load_before, os.getloadavg()[0]],  # before, after
        "cpu": platform.machine(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "chains": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "codec_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"x.clone() {copy_s:.4f} s, np.copy {numpy_copy_s:.4f} s")
    for row in rows:
        print(
            f"{' '.join(row['chain']) or '(empty: fp32)':28s} {row['mb_per_s']:7.0f} MB/s "
            f"{row['vs_copy']:.3f}x clone {row['vs_numpy_copy']:.3f}x np.copy"
        )


if __name__ == "__main__":
    main()
