"""export_onnx.py, run as users run it: the file passes onnx.checker, holds standard depthwise
Conv nodes only, and onnxruntime (CPU) gives the PyTorch model's logits at other batch sizes
and image sizes than the export's, in training and deployed form, from checkpoints in main.py's
layout; bad input is one error line and writes nothing."""
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import SLaK
from conftest import REPO, cli_env

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

KWARGS = dict(width_factor=0.25, kernel_size=[13, 11, 9, 7, 3], Decom=True, num_classes=4)
FLAGS = ["--model", "SLaK_tiny", "--width_factor", "0.25", "--Decom", "true",
         "--kernel_size", "13", "11", "9", "7", "3", "--nb_classes", "4", "--input_size", "32"]


def run_export(*args, **env):
    return subprocess.run([sys.executable, str(REPO / "export_onnx.py"), *map(str, args)],
                          cwd=REPO, env={**cli_env(), **env}, capture_output=True, text=True,
                          timeout=300)


def trained_like_model():
    """A tiny SLaK whose BatchNorms hold non-trivial statistics, so folding them is tested."""
    torch.manual_seed(0)
    model = timm.create_model("SLaK_tiny", **KWARGS)
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.normal_(1, 0.3, generator=generator)
            m.bias.data.normal_(0, 0.3, generator=generator)
        if isinstance(m, SLaK.Block):
            m.gamma.data.fill_(0.5)  # layer scale of a trained model, not 1e-6
    return model.eval()


def check_graph(path, model, deploy):
    """The file passes onnx.checker and holds standard operators only, with one depthwise Conv
    per large-kernel branch, and dynamic batch, height and width."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    depthwise = [node for node in proto.graph.node if node.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in node.attribute)]
    # Large-kernel branches per block: LoRA1 + LoRA2 (+ small_conv in training form).
    assert len(depthwise) == sum(model.depths) * (2 if deploy else 3)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]


def check_against_pytorch(path, model, shapes):
    """onnxruntime's logits for random images of each ``(batch, height, width)`` in ``shapes``
    are PyTorch's: largest absolute difference below ATOL (the logits are of order 1) and the
    same top-1 class."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch, height, width in shapes:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == (batch, 4)
        assert np.abs(got - expected).max() < ATOL, (batch, height, width)
        assert (got.argmax(1) == expected.argmax(1)).all(), (batch, height, width)


# Batches and sizes other than the tracing example's (2 images of 64x64) and the checked shape
# the export is given (1 image of 32x32): 96 and 224 pixels, and a map that is not square.
OTHER_SHAPES = [(1, 96, 96), (3, 224, 224), (3, 96, 160)]
ATOL = 1e-4


@pytest.fixture(scope="module", params=[True, False], ids=["deployed", "training-form"])
def exported(request, tmp_path_factory):
    """``(path, PyTorch model, deploy)``: one export per form, from a checkpoint in main.py's
    layout, with ``--batch_size 1`` (which the tracing example must not pin)."""
    deploy = request.param
    folder = tmp_path_factory.mktemp("deployed" if deploy else "training")
    model = trained_like_model()
    checkpoint = folder / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": {"model": "SLaK_tiny"}}, checkpoint)
    out = folder / "slak.onnx"
    result = run_export(*FLAGS, "--batch_size", "1", "--checkpoint", checkpoint,
                        "--deploy", str(deploy), "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    assert "input images (batch, 3, height, width)" in result.stdout, result.stdout
    assert "checked in onnxruntime at (1, 3, 32, 32)" in result.stdout, result.stdout
    # Written by renaming a checked temporary file: nothing else is left beside it.
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-best.pth", "slak.onnx"]
    return out, model.reparameterize() if deploy else model, deploy


def test_export_is_standard_onnx_with_dynamic_batch_height_width(exported):
    check_graph(*exported)


def test_onnxruntime_matches_pytorch_at_other_batches_and_sizes(exported):
    path, model, _ = exported
    check_against_pytorch(path, model, OTHER_SHAPES)


def test_export_under_the_triton_interpreter_keeps_any_size(tmp_path):
    """With TRITON_INTERPRET=1 (the Triton kernels run on the CPU) the graph is traced as
    without it; the kernels' layout choices by map size would otherwise pin its height and width."""
    pytest.importorskip("triton")
    model = trained_like_model()
    checkpoint = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": {"model": "SLaK_tiny"}}, checkpoint)
    out = tmp_path / "slak.onnx"
    result = run_export(*FLAGS, "--batch_size", "1", "--checkpoint", checkpoint, "--deploy", "true",
                        "--output", out, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    check_graph(out, model.reparameterize(), deploy=True)
    check_against_pytorch(out, model, OTHER_SHAPES[:1])


def test_the_one_pass_op_translates_to_two_standard_convs(triton_kernels, tmp_path):
    """Where the Triton kernels run, a deployed unit traced at a fixed size is one op for both
    convolutions (``slak::dwconv2d_sum``); the translation table turns it into two depthwise
    Convs and an Add, for users who call ``torch.onnx.export`` themselves."""
    from depthwise_conv2d_implicit_gemm.export import onnx_translation_table
    model = trained_like_model().reparameterize()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["images"],
                                    output_names=["logits"], verbose=False,
                                    custom_translation_table=onnx_translation_table())
    assert any("dwconv2d_sum" in str(n.target) for n in program.exported_program.graph.nodes)
    out = tmp_path / "static.onnx"
    program.save(str(out), external_data=False)
    nodes = onnx.load(str(out)).graph.node
    assert all(node.domain in ("", "ai.onnx") for node in nodes)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(["logits"], {"images": x.numpy()})[0]
    assert np.abs(got - expected).max() < ATOL


def test_deployed_checkpoint_exports_and_cannot_be_trained_form(tmp_path):
    model = trained_like_model().reparameterize()
    checkpoint = tmp_path / "deployed.pth"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "deployed.onnx"
    result = run_export(*FLAGS, "--checkpoint", checkpoint, "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    check_graph(out, model, deploy=True)
    check_against_pytorch(out, model, OTHER_SHAPES[:1])

    result = run_export(*FLAGS, "--checkpoint", checkpoint, "--deploy", "false",
                        "--output", tmp_path / "train.onnx")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--deploy true" in lines[0], result.stderr
    assert not (tmp_path / "train.onnx").exists()


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "missing.pth"], "file not found"),
    (["--checkpoint", "{ckpt}", "--Decom", "false"], "--Decom True; this run has --Decom False"),
    (["--kernel_size", "13", "11", "9", "7"], "--kernel_size takes five integers"),
    (["--output", "{tmp}/no/such/folder/x.onnx"], "does not exist; create it first"),
    (["--output", "{tmp}"], "names a folder; pass the file to write"),
    (["--model", "resnet50"], "exports SLaK models"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"model": trained_like_model().state_dict()}, checkpoint)
    args = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in args]
    out = tmp_path / "x.onnx"
    result = run_export(*FLAGS, "--output", out, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]
