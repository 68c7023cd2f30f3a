"""``upete enhance``: enhance one PET series from folders, offline, exactly as the node would."""

from __future__ import annotations

import argparse

from dicomnode.config import resolve_checkpoint
from dicomnode.logs import setup_logging
from upete.commands.common import EXIT_USAGE, add_config_option, fail, load_config


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "enhance",
        help="enhance a PET series from folders (offline) and write the derived series",
        description="Read one PET series (--pet) and its CT (--ct) from folders, searched recursively "
        "(non-DICOM files are ignored; a folder must hold exactly one series of that modality), enhance "
        "the PET with the model of the config and write the derived PET series into --out, exactly as "
        "the node sends it. The CT is used when it covers the patient's body (a CT narrower than the "
        "PET's field of view is fine); when it misses part of the patient, the PET-only model runs and "
        "says why. Exit status 0 on success, 1 when the input cannot be enhanced, 2 on usage or config "
        "errors.",
    )
    parser.add_argument("--pet", metavar="DIR", required=True, help="folder holding the PET series")
    parser.add_argument("--ct", metavar="DIR", help="folder holding the CT series of the same study")
    parser.add_argument("--no-ct", action="store_true", help="enhance without a CT (PET-only model variant)")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for the derived series")
    add_config_option(parser)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"),
                        help="overrides model.device of the config")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step to stderr")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.ct and args.no_ct:
        return fail("give either --ct DIR or --no-ct, not both", 2)
    if not args.ct and not args.no_ct:
        return fail("give --ct DIR (the CT of the study), or --no-ct to enhance without a CT", 2)
    settings = load_config(args)
    if settings is None:
        return EXIT_USAGE
    setup_logging("INFO" if args.verbose else "WARNING", settings.logging.format)

    # Imported here so `upete --help` stays fast.
    from dicomnode.folders import FolderError, find_series
    from dicomnode.pipeline import enhance_series
    from dicomnode.volume import VolumeError
    from dicomnode.worker import inference_options
    from model.enhance import Enhancer, load_enhancer

    try:
        pet_paths = find_series(args.pet, "PT")
        ct_paths = None if args.no_ct else find_series(args.ct, "CT")
    except FolderError as exc:
        return fail(str(exc), 1)

    model = settings.model
    device = args.device or model.device
    spec = model.checkpoint

    def load(spec: str) -> Enhancer:
        return load_enhancer(resolve_checkpoint(spec), options=inference_options(model, device=device))

    try:
        enhancer = load(spec)
        without_ct = None
        # The PET-only model stands by whenever the main one needs a CT: the CT given may turn out not
        # to cover the patient (known only once its pixels are read).
        if enhancer.info.requires_ct and model.checkpoint_without_ct is not None:
            spec = model.checkpoint_without_ct
            without_ct = load(spec)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        return fail(f"cannot load the model {spec!r}: {exc}", 2)
    if ct_paths is None and enhancer.info.requires_ct and without_ct is None:
        return fail(f"{enhancer.info.name} needs a CT and model.checkpoint_without_ct is not set; "
                    "give --ct DIR", 2)

    try:
        result = enhance_series(pet_paths, ct_paths, enhancer, args.out, output=settings.output,
                                without_ct=without_ct, no_ct_reason="--no-ct was given")
    except VolumeError as exc:
        return fail(f"cannot enhance this series: {exc}", 1)

    info = result.info
    print(f"wrote {len(result.paths)} file(s) to {args.out}")
    with_ct = f" with a CT of {len(ct_paths)} slice(s)" if result.ct_used and ct_paths else ""
    print(f"derived series {result.plan.series_uid} (SeriesNumber {result.plan.series_number}) from "
          f"{len(pet_paths)} PET slice(s){with_ct}")
    print(f"enhancer: {info.name}, version {info.version}, device {device}")
    if result.ct_note:
        print(f"CT not used: {result.ct_note}")
    for note in result.notes:
        print(f"note: {note}")
    total = sum(result.seconds_by_stage.values())
    stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.seconds_by_stage.items())
    print(f"time: {stages} (total {total:.2f} s)")
    return 0
