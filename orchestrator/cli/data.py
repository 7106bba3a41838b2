"""``metaray data``: dataset commands of the command line.

    metaray data convert omniglot images_background.zip images_evaluation.zip omniglot.arrow
    metaray data convert miniimagenet mini-imagenet/ miniimagenet.arrow [--size 84]
    metaray data convert cifar-fs cifar-100-python/ cifar-fs.arrow       (or cifar-100-python.tar.gz)
    metaray data convert fc100 cifar-100-python.tar.gz fc100.arrow
    metaray data convert tieredimagenet tiered-imagenet/ tiered.arrow
    metaray data convert imagefolder flowers/ flowers.arrow --size 64 --channels 3
        [--min-per-class N] [--skip-bad] [--overwrite]
    metaray data verify omniglot.arrow

A conversion writes one memory-mappable store (``tasks.store``) atomically;
progress is shown on stderr when it is a terminal. CIFAR-FS, FC100 and
tieredImageNet come as pickles: they are read with a restricted unpickler that
builds only arrays and containers, yet convert only the official files.
``verify`` re-hashes a whole store against the checksums written with it.
Bad input raises ``DataError``, which ``orchestrator.cli.main`` turns into one line
and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from tasks.store import DataError

CONVERTERS = {
    "omniglot": ("tasks.converters.omniglot", "convert_omniglot"),
    "miniimagenet": ("tasks.converters.miniimagenet", "convert_miniimagenet"),
    "cifar-fs": ("tasks.converters.cifar", "convert_cifar_fs"),
    "fc100": ("tasks.converters.cifar", "convert_fc100"),
    "tieredimagenet": ("tasks.converters.tieredimagenet", "convert_tieredimagenet"),
    "imagefolder": ("tasks.converters.imagefolder", "convert_imagefolder"),
}
SOURCES = tuple(CONVERTERS)
DEFAULT_SIZE = {"omniglot": 28, "miniimagenet": 84, "cifar-fs": 32, "fc100": 32, "tieredimagenet": 84,
                "imagefolder": 84}
ONE_SOURCE = ("cifar-fs", "fc100", "tieredimagenet")
GREYSCALE = ("omniglot",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` (with its ``convert`` and ``verify`` sub-commands) to the top-level sub-commands."""
    d = subparsers.add_parser("data", help="convert image datasets into memory-mapped stores, verify stores")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("convert", help="convert a dataset (Omniglot, miniImageNet, CIFAR-FS, FC100, tieredImageNet, "
                                        "any ImageFolder) into a store",
                        description="examples:\n" + __doc__.split("\n\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("source", choices=SOURCES, help="the layout of SRC")
    c.add_argument("src", nargs="+", metavar="SRC", help="dataset zip(s) or folder(s); several make one store")
    c.add_argument("dest", metavar="DEST", help="the store file to write, e.g. omniglot.arrow")
    c.add_argument("--size", type=int, help="resize images to SIZE x SIZE (default: omniglot 28, cifar-fs and fc100 "
                                            "32, others 84)")
    c.add_argument("--channels", type=int, choices=(1, 3), help="imagefolder only: 1 = greyscale, 3 = RGB (default)")
    c.add_argument("--min-per-class", type=int, default=1, metavar="N",
                   help="require N images per class, e.g. k_shot + query (default 1)")
    c.add_argument("--skip-bad", action="store_true",
                   help="leave bad images/classes out and list them in DEST.skipped.txt instead of failing")
    c.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    v = dsub.add_parser("verify", help="re-hash a store's pixels and labels against the checksums written with it")
    v.add_argument("store", metavar="STORE", help="the store file, e.g. omniglot.arrow")


def run(args: argparse.Namespace) -> int:
    """Run a ``data`` sub-command; returns the exit code (DataError propagates to the CLI)."""
    if args.data_command == "verify":
        return verify(args.store)
    if args.data_command != "convert":
        raise DataError(f"unknown data command {args.data_command!r}")
    if args.channels is not None and args.source != "imagefolder":
        raise DataError(f"--channels applies to imagefolder only; {args.source} images are "
                        f"{'greyscale' if args.source in GREYSCALE else 'RGB'}")
    if args.source in ONE_SOURCE and len(args.src) != 1:
        raise DataError(f"{args.source} converts one source, got {len(args.src)}: {' '.join(args.src)}")
    options = {"size": args.size or DEFAULT_SIZE[args.source], "min_per_class": args.min_per_class,
               "skip_bad": args.skip_bad, "overwrite": args.overwrite, "progress": _Progress()}
    if args.source == "imagefolder":
        options["channels"] = args.channels or 3
    start = time.perf_counter()
    try:
        done = _converter(args.source)(args.src[0] if args.source in ONE_SOURCE else args.src, args.dest, **options)
    finally:
        options["progress"].clear()
    print(f"wrote {done.dest}: {done.num_classes} classes, {done.num_images} images "
          f"in {time.perf_counter() - start:.1f}s")
    if done.skipped:
        print(f"skipped {len(done.skipped)} bad images/classes, listed in {done.skipped_path}")
    return 0


def verify(path: str) -> int:
    """``metaray data verify``: the whole store re-hashed; a mismatch is a DataError (exit 2, one line)."""
    from tasks.store import ImageStore

    start = time.perf_counter()
    store = ImageStore.open(path, verify=True)
    mb = store.nbytes / 2**20
    print(f"ok: {store.path}: {store.num_classes} classes, {store.num_images} images, {mb:.1f} MB, "
          f"format version {store.format_version}, {store.content_hash} (verified in "
          f"{time.perf_counter() - start:.1f}s)")
    return 0


def _converter(source: str):
    # Imported on use: only the chosen source's modules are loaded.
    module, name = CONVERTERS[source]
    return getattr(importlib.import_module(module), name)


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
