"""export_onnx.py, run as users run it: the file passes onnx.checker, holds standard depthwise
Conv nodes only, and onnxruntime (CPU) gives the PyTorch model's logits at other batch sizes
than the export's, in training and deployed form, from checkpoints in main.py's layout."""
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


def check_against_onnxruntime(path, model, deploy):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    depthwise = [node for node in proto.graph.node if node.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in node.attribute)]
    # Large-kernel branches per block: LoRA1 + LoRA2 (+ small_conv in training form).
    assert len(depthwise) == sum(model.depths) * (2 if deploy else 3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    for batch in (1, 5):  # the export traced batch 2
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == (batch, 4)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4


@pytest.mark.parametrize("deploy", [True, False])
def test_export_matches_pytorch_in_onnxruntime(deploy, tmp_path):
    model = trained_like_model()
    checkpoint = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": {"model": "SLaK_tiny"}}, checkpoint)
    out = tmp_path / "slak.onnx"
    result = run_export(*FLAGS, "--checkpoint", checkpoint, "--deploy", str(deploy), "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    # Written by renaming a checked temporary file: nothing else is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best.pth", "slak.onnx"]
    check_against_onnxruntime(out, model.reparameterize() if deploy else model, deploy)


def test_deployed_units_export_where_their_one_pass_op_runs(tmp_path):
    """Where the Triton kernels run (a GPU; here their interpreter) a deployed unit traces as
    one op for both convolutions (``slak::dwconv2d_sum``); it exports as two standard
    depthwise Convs and an Add."""
    pytest.importorskip("triton")
    model = trained_like_model()
    checkpoint = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": {"model": "SLaK_tiny"}}, checkpoint)
    out = tmp_path / "slak.onnx"
    result = run_export(*FLAGS, "--checkpoint", checkpoint, "--deploy", "true", "--output", out,
                        TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-3000:]
    check_against_onnxruntime(out, model.reparameterize(), deploy=True)


def test_deployed_checkpoint_exports_and_cannot_be_trained_form(tmp_path):
    model = trained_like_model().reparameterize()
    checkpoint = tmp_path / "deployed.pth"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "deployed.onnx"
    result = run_export(*FLAGS, "--checkpoint", checkpoint, "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    check_against_onnxruntime(out, model, deploy=True)

    result = run_export(*FLAGS, "--checkpoint", checkpoint, "--deploy", "false",
                        "--output", tmp_path / "train.onnx")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--deploy true" in lines[0], result.stderr
    assert not (tmp_path / "train.onnx").exists()


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "missing.pth"], "file not found"),
    (["--checkpoint", "{ckpt}", "--Decom", "false"], "--Decom True; this run has --Decom False"),
    (["--kernel_size", "13", "11", "9", "7"], "--kernel_size takes five integers"),
    (["--output", "{tmp}/no/such/folder/x.onnx"], "does not exist"),
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
