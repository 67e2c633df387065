"""`sceneparse convert csail`: CSAIL's encoder/decoder files -> one sceneparse checkpoint.
`sceneparse convert sbd`: SBD's extra VOC labels -> the `voc` dataset's `train_aug` split."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert other code bases' weights or datasets",
        description="Convert other code bases' weights into a sceneparse checkpoint (csail), or a dataset's "
        "labels into a layout sceneparse reads (sbd).",
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    csail = sources.add_parser(
        "csail",
        help="CSAIL semantic-segmentation-pytorch ADE20K models",
        description="Convert CSAIL's encoder_epoch_N.pth and decoder_epoch_N.pth (ADE20K, 150 classes) "
        "into one checkpoint with ADE20K's class names and palette.",
    )
    csail.add_argument("--encoder", required=True, metavar="E.pth", help="CSAIL encoder_epoch_N.pth")
    csail.add_argument("--decoder", required=True, metavar="D.pth", help="CSAIL decoder_epoch_N.pth")
    csail.add_argument(
        "--arch",
        required=True,
        metavar="NAME",
        help="CSAIL model name, e.g. resnet50dilated-ppm_deepsup, resnet101-upernet, hrnetv2-c1",
    )
    csail.add_argument("--output", required=True, metavar="model.pt", help="checkpoint to write")
    csail.set_defaults(func=_convert_csail)

    sbd = sources.add_parser(
        "sbd",
        help="SBD's extra Pascal VOC labels -> VOC's train_aug split",
        description="Convert SBD's cls/*.mat labels (Hariharan et al.) into VOC2012/SegmentationClassAug/*.png "
        "and write ImageSets/Segmentation/train_aug.txt: (VOC train + SBD train + SBD val) - VOC val, "
        "VOC's own label where it has one. Then train with data.kind=voc data.train_split=train_aug. "
        "Needs scipy (pip install 'sceneparse[sbd]').",
    )
    sbd.add_argument("--sbd-root", required=True, metavar="DIR", help="SBD download (holding benchmark_RELEASE/)")
    sbd.add_argument("--voc-root", required=True, metavar="DIR", help="VOC download (holding VOCdevkit/VOC2012/)")
    sbd.set_defaults(func=_convert_sbd)


def _convert_csail(args) -> int:
    # Imported here so that `sceneparse --help` does not load torch.
    from sceneparse.zoo.csail import convert_csail_files

    path = convert_csail_files(args.encoder, args.decoder, args.arch, args.output)
    print(f"wrote {path} ({args.arch}, 150 ADE20K classes)")
    return 0


def _convert_sbd(args) -> int:
    from sceneparse.data.sbd import convert_sbd

    list_file, count, from_voc = convert_sbd(args.sbd_root, args.voc_root)
    print(f"wrote {list_file}: {count} images ({from_voc} labels from VOC, {count - from_voc} from SBD)")
    return 0
