"""The original release's distillation entry point, kept so that commands written for it run.

Everything is ``main.py``'s (distillation is ``--distill_type``), except that ``--distill_type``
defaults to ``KD``, as in the original's script; the flags the original accepted without using
them are accepted here and reported as having no effect.

    python main_KD.py --model SLaK_tiny --model_s SLaK_tiny --distill_type NKD ...
"""
import sys

import main

# Flags of the original's distillation script that changed nothing in its training.
NO_EFFECT_FLAGS = ["--alpha_mgd", "--lambda_mgd", "--feature_n", "--target_Lnorm", "--flag"]


def get_args_parser():
    parser = main.get_args_parser()
    parser.set_defaults(distill_type="KD")  # the original's script distilled with KD by default
    group = parser.add_argument_group("accepted for the original's commands, no effect")
    for flag in NO_EFFECT_FLAGS:
        group.add_argument(flag, nargs="?", const=True, default=None, help="no effect")
    return parser


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    for flag in NO_EFFECT_FLAGS:
        if getattr(args, flag.lstrip("-")) is not None:
            print(f"Note: {flag} has no effect (the original's distillation did not use it)")
        delattr(args, flag.lstrip("-"))
    main.run_main(args, argv)


if __name__ == "__main__":
    cli()
