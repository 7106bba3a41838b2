"""``metaray data``: dataset commands of the command line.

    metaray data convert omniglot images_background.zip images_evaluation.zip omniglot.arrow
    metaray data convert miniimagenet mini-imagenet/ miniimagenet.arrow [--size 84]
    metaray data convert imagefolder flowers/ flowers.arrow --size 64 --channels 3
        [--min-per-class N] [--skip-bad] [--overwrite]

A conversion writes one memory-mappable store (``tasks.store``) atomically;
progress is shown on stderr when it is a terminal. Bad input raises
``DataError``, which ``orchestrator.cli`` turns into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from tasks.store import DataError

SOURCES = ("omniglot", "miniimagenet", "imagefolder")
DEFAULT_SIZE = {"omniglot": 28, "miniimagenet": 84, "imagefolder": 84}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` (with its ``convert`` sub-command) to the top-level sub-commands."""
    d = subparsers.add_parser("data", help="convert image datasets into memory-mapped stores")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("convert", help="convert a dataset (Omniglot, miniImageNet, any ImageFolder) into a store",
                        description="examples:\n" + __doc__.split("\n\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("source", choices=SOURCES, help="the layout of SRC")
    c.add_argument("src", nargs="+", metavar="SRC", help="dataset zip(s) or folder(s); several make one store")
    c.add_argument("dest", metavar="DEST", help="the store file to write, e.g. omniglot.arrow")
    c.add_argument("--size", type=int, help="resize images to SIZE x SIZE (default: omniglot 28, others 84)")
    c.add_argument("--channels", type=int, choices=(1, 3), help="imagefolder only: 1 = greyscale, 3 = RGB (default)")
    c.add_argument("--min-per-class", type=int, default=1, metavar="N",
                   help="require N images per class, e.g. k_shot + query (default 1)")
    c.add_argument("--skip-bad", action="store_true",
                   help="leave bad images/classes out and list them in DEST.skipped.txt instead of failing")
    c.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")


def run(args: argparse.Namespace) -> int:
    """Run a ``data`` sub-command; returns the exit code (DataError propagates to the CLI)."""
    if args.data_command != "convert":
        raise DataError(f"unknown data command {args.data_command!r}")
    from tasks.imagefolder import convert_imagefolder
    from tasks.miniimagenet import convert_miniimagenet
    from tasks.omniglot import convert_omniglot

    if args.channels is not None and args.source != "imagefolder":
        raise DataError(f"--channels applies to imagefolder only; {args.source} images are "
                        f"{'greyscale' if args.source == 'omniglot' else 'RGB'}")
    options = {"size": args.size or DEFAULT_SIZE[args.source], "min_per_class": args.min_per_class,
               "skip_bad": args.skip_bad, "overwrite": args.overwrite, "progress": _Progress()}
    if args.source == "imagefolder":
        options["channels"] = args.channels or 3
    convert = {"omniglot": convert_omniglot, "miniimagenet": convert_miniimagenet,
               "imagefolder": convert_imagefolder}[args.source]
    start = time.perf_counter()
    try:
        done = convert(args.src, args.dest, **options)
    finally:
        options["progress"].clear()
    print(f"wrote {done.dest}: {done.num_classes} classes, {done.num_images} images "
          f"in {time.perf_counter() - start:.1f}s")
    if done.skipped:
        print(f"skipped {len(done.skipped)} bad images/classes, listed in {done.skipped_path}")
    return 0


class _Progress:
    """A counter line on stderr, redrawn at most 5 times a second; silent when stderr is not a terminal."""

    def __init__(self) -> None:
        self.active, self._last = sys.stderr.isatty(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.active and (now - self._last > 0.2 or done == total):
            self._last = now
            print(f"\rconverting: {done}/{total} images", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.active and self._last:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
