"""`sceneparse zoo list` and `sceneparse zoo download NAME`: CSAIL's published ADE20K models."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "zoo", help="list / download the published pretrained models",
        description="CSAIL's published ADE20K models: list them with their published scores, "
                    "or download one and convert it to a sceneparse checkpoint.")
    actions = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list", help="table of the published models and their cache state",
        description="Print a table of CSAIL's published ADE20K models: encoder, decoder, published "
                    "val scores (single- and multi-scale), whether each is in the cache, and the source URLs.")
    listing.add_argument("--cache-dir", help="cache folder (default: $SCENEPARSE_CACHE or ~/.cache/sceneparse)")
    listing.set_defaults(func=_list)

    download = actions.add_parser(
        "download", help="download + convert one model, print its checkpoint path",
        description="Download CSAIL's encoder and decoder files of one model into the cache, "
                    "convert them to a sceneparse checkpoint and print its path; a cached model is not "
                    "downloaded again. Use the name or the path with --model / model.weights.")
    download.add_argument("name", help="model name, see `sceneparse zoo list`")
    download.add_argument("--cache-dir", help="cache folder (default: $SCENEPARSE_CACHE or ~/.cache/sceneparse)")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    download.set_defaults(func=_download)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _list(args: argparse.Namespace) -> int:
    from sceneparse.zoo import ZOO, cache_state, default_cache_dir

    header = ["name", "encoder", "decoder", "mIoU", "mIoU-ms", "pixAcc", "pixAcc-ms",
              "overall", "overall-ms", "cache"]
    rows = []
    for entry in ZOO.values():
        ss, ms = entry.single_scale, entry.multi_scale
        rows.append([entry.name, entry.encoder, entry.decoder,
                     _fmt(ss.mean_iou), _fmt(ms.mean_iou), _fmt(ss.pixel_accuracy), _fmt(ms.pixel_accuracy),
                     _fmt(ss.overall), _fmt(ms.overall), cache_state(entry.name, args.cache_dir)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())

    print("\nScores: CSAIL's published ADE20K val numbers in % (README of "
          "CSAILVision/semantic-segmentation-pytorch); -ms: multi-scale testing.")
    print(f"cache: {args.cache_dir or default_cache_dir()} (converted = ready, raw = CSAIL files "
          "present, converted on first use)")
    print("Sources:")
    for entry in ZOO.values():
        print(f"  {entry.name}:")
        for url in entry.urls():
            print(f"    {url}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from sceneparse.zoo import download_model

    print(download_model(args.name, cache_dir=args.cache_dir, progress=not args.no_progress))
    return 0
