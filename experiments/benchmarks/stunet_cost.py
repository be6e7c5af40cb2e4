"""Parameters, forward MACs and fp32 activation memory of one STU-Net, counted on the meta device (no weights,
no compute): the numbers STU-Net publishes as "FLOPs" are multiply-accumulates.

    PYTHONPATH=. .venv/bin/python experiments/benchmarks/stunet_cost.py --size l [--patch 128 128 128]
        [--batch 2] [--in-channels 1] [--num-classes 105] [--pools 2x2x2 2x2x2 2x2x2 2x2x2 1x2x2]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aeval.models.stunet import STUNET_SIZES, summarize


def report(size: str, patch: Sequence[int], batch: int, in_channels: int, num_classes: int,
           pools: Sequence[Sequence[int]] | None) -> str:
    stats = summarize(size, patch, batch, in_channels, num_classes, pools)
    macs = stats["flops"] / 2
    return "\n".join([
        f"STU-Net {size.upper()}  in_channels={in_channels} num_classes={num_classes}  "
        f"patch={'x'.join(map(str, patch))}  batch={batch}",
        f"  parameters        {int(stats['parameters']):,} ({stats['parameters'] / 1e6:.2f} M)",
        f"  forward MACs      {macs / 1e12:.3f} T ({macs / 1e9:,.1f} G; multiply-accumulates, the 'FLOPs' "
        "STU-Net publishes)",
        f"  forward FLOPs     {2 * macs / 1e12:.3f} T (2 per MAC, convolutions only)",
        f"  activations fp32  {stats['activation_bytes'] / 2**30:.2f} GiB kept for backward "
        "(roughly half under bf16 autocast; weights, gradients and optimizer state come on top)",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="s", choices=sorted(STUNET_SIZES))
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=105)
    parser.add_argument("--pools", nargs="+", default=None, help="one AxBxC kernel per pooling stage")
    args = parser.parse_args(argv)
    pools = [[int(v) for v in p.split("x")] for p in args.pools] if args.pools else None
    try:
        print(report(args.size, args.patch, args.batch, args.in_channels, args.num_classes, pools))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
