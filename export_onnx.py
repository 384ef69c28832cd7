"""Export a SLaK model to ONNX, in its deployed (re-parameterised) or its training form.

    python export_onnx.py --model SLaK_tiny --Decom True --kernel_size 51 49 47 13 5 \
        --width_factor 1.3 --checkpoint checkpoint-best.pth --deploy true --output slak_tiny.onnx

The model flags are main.py's (one definition, ``main.add_model_args``); ``--checkpoint`` takes
a checkpoint of main.py or of the original release, in training or deployed form, or a bare state
dict. The graph holds standard ONNX operators only: each large-kernel convolution is a depthwise
``Conv`` (see ``depthwise_conv2d_implicit_gemm/export.py``). Input ``images`` is
``(batch, 3, height, width)`` with all three dynamic (height and width at least 32, the
network's total stride); output ``logits`` is ``(batch, nb_classes)``. The file is written
atomically and checked with ``onnx.checker``; where onnxruntime is installed it is also run at
``(--batch_size, 3, --input_size, --input_size)`` against the PyTorch model.
"""
import contextlib
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
from utils import ConfigError, RunStopped, check_flag_ranges, run_cli, str2bool

# Keys only a deployed checkpoint has: the large-kernel branches carry their folded bias.
_DEPLOYED_KEY = re.compile(r"\.large_kernel\.(LoRA1|lkb_origin)\.conv\.bias$")
# The tracing example, whatever shape the user asks for: torch.export specialises a dimension
# of size 1 (a batch of one would pin the batch axis) and the last stage's map must stay above 1
# pixel (64 / 32 = 2), so no axis of the graph is fixed by the example.
_EXAMPLE_SHAPE = (2, 3, 2 * SLaK.TOTAL_STRIDE, 2 * SLaK.TOTAL_STRIDE)
# Largest |onnxruntime - PyTorch| logit difference accepted by the check, relative to the
# largest logit (float32 rounding of two implementations is orders of magnitude below it).
_CHECK_TOLERANCE = 1e-3


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
                       help="batch at which the written file is checked against PyTorch (with "
                            "--input_size); the exported batch, height and width are dynamic")
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
    check_output_file(args.output)


def check_output_file(output):
    """Fail now, before the export, unless ``output`` names a file in an existing writable folder."""
    if os.path.isdir(output) or output.endswith(os.sep):
        raise ConfigError(f"--output {output} names a folder; pass the file to write, e.g. "
                          f"--output {os.path.join(output, 'slak.onnx')}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ConfigError(f"--output {output}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: folder {folder} is not writable; pass a folder "
                          f"you can write to")


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


@contextlib.contextmanager
def _reference_convolution():
    """The large-kernel convolution as ``F.conv2d`` while tracing, even under TRITON_INTERPRET=1
    (the test setting that runs the Triton kernels on the CPU): their layouts are chosen by map
    size, which would pin the graph's height and width. The ONNX graph is the same either way."""
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def trace(model, opset):
    """``torch.onnx.export``'s program of ``model`` with dynamic batch, height and width."""
    shape = {0: torch.export.Dim("batch"),
             2: torch.export.Dim("height", min=SLaK.TOTAL_STRIDE),
             3: torch.export.Dim("width", min=SLaK.TOTAL_STRIDE)}
    with torch.no_grad(), _reference_convolution():
        return torch.onnx.export(
            model, (torch.randn(_EXAMPLE_SHAPE),), dynamo=True, opset_version=opset,
            verbose=False, input_names=["images"], output_names=["logits"],
            dynamic_shapes=(shape,), custom_translation_table=onnx_translation_table())


def check_against_pytorch(path, model, shape):
    """The largest logit difference between onnxruntime running ``path`` and ``model`` on a
    random batch of ``shape``, relative to the largest logit; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x.numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(abs(got - expected).max() / max(abs(expected).max(), 1e-12))


def export(model, args):
    """Write ``model`` to ``args.output``: a temporary file beside it, checked, then renamed.
    Returns the relative difference from PyTorch at the user's shape (None if not checked)."""
    import onnx
    program = trace(model, args.opset)
    folder = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        onnx.checker.check_model(tmp, full_check=True)
        shape = (args.batch_size, 3, args.input_size, args.input_size)
        difference = check_against_pytorch(tmp, model, shape)
        if difference is not None and not difference <= _CHECK_TOLERANCE:
            raise RunStopped(f"the exported graph's logits differ from PyTorch's by {difference:.2g} "
                             f"of the largest at {shape} (more than {_CHECK_TOLERANCE:g}); nothing "
                             f"written: please report it with the command you ran")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the export is an ordinary file
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return difference


def main(args):
    check_args(args)
    model = load_model(args)
    difference = export(model, args)
    form = "deployed" if args.deploy else "training-form"
    shape = f"({args.batch_size}, 3, {args.input_size}, {args.input_size})"
    checked = (f"checked in onnxruntime at {shape}: largest logit difference from PyTorch "
               f"{difference:.1e} of the largest logit" if difference is not None else
               "not run: pip install onnxruntime to check it against PyTorch")
    print(f"Wrote {args.output}: {form} {args.model}, input images (batch, 3, height, width), "
          f"output logits (batch, {args.nb_classes}); {checked}")


def cli(argv=None):
    run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
