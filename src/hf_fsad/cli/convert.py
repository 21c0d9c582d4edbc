"""`hf-fsad convert`: an open_clip checkpoint, or the official AF-CLIP weights, to transformers."""

from __future__ import annotations

import argparse

from ._errors import CliError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert", help="convert an open_clip checkpoint, or the official AF-CLIP weights, to transformers"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--open-clip", help="open_clip model name, e.g. ViT-B-16-plus-240")
    source.add_argument(
        "--afclip-official",
        nargs=2,
        metavar=("PROMPT", "ADAPTOR"),
        help="the AF-CLIP authors' <dataset>_prompt.pt and <dataset>_adaptor.pt: writes an AfClipModel",
    )
    parser.add_argument("--pretrained", help="with --open-clip: open_clip pretrained tag, e.g. laion400m_e31")
    parser.add_argument(
        "--clip",
        help="with --afclip-official: the CLIP the weights were trained on "
        "(default: openai/clip-vit-large-patch14-336)",
    )
    parser.add_argument(
        "--image-size", type=int, help="with --afclip-official: model input size (default 518, the paper's)"
    )
    parser.add_argument(
        "--trained-on", help="with --afclip-official: the weights' auxiliary dataset, e.g. mvtec_ad or visa"
    )
    parser.add_argument("output_dir", help="directory to write the converted model to")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    afclip_only = {"--clip": args.clip, "--image-size": args.image_size, "--trained-on": args.trained_on}
    given = [option for option, value in afclip_only.items() if value is not None]
    if args.afclip_official:
        if args.pretrained is not None:
            raise CliError("--pretrained goes with --open-clip, not --afclip-official")
        from hf_fsad.models.afclip.convert_afclip import convert_official_afclip

        prompt, adaptor = args.afclip_official
        output = convert_official_afclip(
            prompt,
            adaptor,
            args.clip or "openai/clip-vit-large-patch14-336",
            args.output_dir,
            args.image_size or 518,
            args.trained_on,
        )
        print(f"saved AfClipModel with the official prompt and adaptor to {output}")
        return 0
    if given:
        raise CliError(f"{', '.join(given)} go with --afclip-official, not --open-clip")
    from hf_fsad.backbones.convert import convert_open_clip

    output = convert_open_clip(args.open_clip, args.pretrained, args.output_dir)
    print(f"saved CLIPModel, tokenizer and image processor to {output}")
    return 0
