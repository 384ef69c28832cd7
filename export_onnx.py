"""Export a SLaK model to ONNX, in its deployed (re-parameterised) or its training form.

    python export_onnx.py --model SLaK_tiny --Decom True --kernel_size 51 49 47 13 5 \
        --width_factor 1.3 --checkpoint checkpoint-best.pth --deploy true --output slak_tiny.onnx

The model flags are main.py's (one definition, ``main.add_model_args``); ``--checkpoint`` takes
a checkpoint of main.py or of the original release, in training or deployed form, or a bare state
dict. The graph holds standard ONNX operators only: each large-kernel convolution is a depthwise
``Conv`` (see ``depthwise_conv2d_implicit_gemm/export.py``). Input ``images`` is
``(batch, 3, input_size, input_size)`` with a dynamic batch axis; output ``logits`` is
``(batch, nb_classes)``. The file is written atomically and checked with ``onnx.checker``.
"""
import os
import re
import tempfile

import torch

import SLaK
from checkpoint import load_state_dict_checked, open_checkpoint
from depthwise_conv2d_implicit_gemm.export import onnx_translation_table
from main import ArgumentParser, add_model_args
from model_factory import build_model
from slak_config import args_model_config
from utils import ConfigError, check_flag_ranges, run_cli, str2bool

# Keys only a deployed checkpoint has: the large-kernel branches carry their folded bias.
_DEPLOYED_KEY = re.compile(r"\.large_kernel\.(LoRA1|lkb_origin)\.conv\.bias$")


class ExportArgumentParser(ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python export_onnx.py --help)\n")


def get_args_parser():
    parser = ExportArgumentParser(description="Export a SLaK model to ONNX")
    add_model_args(parser.add_argument_group("model (as for main.py)"))
    group = parser.add_argument_group("export")
    group.add_argument("--checkpoint", default="", help="weights to export (default: random init)")
    group.add_argument("--deploy", type=str2bool, default=True,
                       help="export the re-parameterised inference form (BatchNorms and small "
                            "kernels folded into the large kernels)")
    group.add_argument("--output", required=True, help="the .onnx file to write")
    group.add_argument("--batch_size", type=int, default=2,
                       help="batch of the tracing example; the exported batch axis is dynamic")
    group.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    return parser


def check_args(args):
    check_flag_ranges(args)
    try:
        SLaK.validate_kernel_size(args.kernel_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.model not in SLaK.MODEL_DEPTHS_DIMS:
        raise ConfigError(f"--model {args.model}: export_onnx.py exports SLaK models; use one of "
                          f"{', '.join(SLaK.MODEL_DEPTHS_DIMS)}")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: file not found")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise ConfigError(f"--output {args.output}: folder {folder} does not exist; create it first")


def load_model(args):
    """The model in eval mode, deployed when ``--deploy true``, with ``--checkpoint``'s weights."""
    state_dict = open_checkpoint(args.checkpoint, "--checkpoint", args_model_config(args),
                                 ignore=("deploy",))[1] if args.checkpoint else None
    deployed_checkpoint = state_dict is not None and any(map(_DEPLOYED_KEY.search, state_dict))
    if deployed_checkpoint and not args.deploy:
        raise ConfigError(f"--checkpoint {args.checkpoint} holds a deployed (re-parameterised) "
                          f"model, which has no training form; pass --deploy true")
    model = build_model(args, args.model, args.nb_classes, deploy=deployed_checkpoint)
    if state_dict is not None:
        load_state_dict_checked(model, state_dict, "--checkpoint", args.checkpoint)
    model.eval()
    if args.deploy:
        model.reparameterize()
    return model


def export(model, args):
    """Write ``model`` to ``args.output``: a temporary file beside it, checked, then renamed."""
    import onnx
    example = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=args.opset, verbose=False,
            input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            custom_translation_table=onnx_translation_table())
    folder = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        onnx.checker.check_model(tmp, full_check=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the export is an ordinary file
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(args):
    check_args(args)
    model = load_model(args)
    export(model, args)
    form = "deployed" if args.deploy else "training-form"
    print(f"Wrote {args.output}: {form} {args.model}, input images (batch, 3, {args.input_size}, "
          f"{args.input_size}), output logits (batch, {args.nb_classes})")


def cli(argv=None):
    run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
