"""SLaK models: original state-dict compatibility, re-parameterisation, timm registration."""
import json

import pytest
import timm
import torch

import SLaK
from conftest import REPO

# Every model SLaK.py registers with timm (the import above registers them).
SLAK_MODELS = timm.list_models("SLaK*")
# Names, shapes and parameter counts of the original release's models (six configurations).
REFERENCE = json.loads((REPO / "tests" / "data" / "official_state_dict_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_official_state_dict_names_shapes_and_strict_load(name):
    config = REFERENCE[name]
    model = timm.create_model(config["model"], **config["kwargs"])
    own = model.state_dict()
    assert list(own) == list(config["state_dict"])
    assert {k: list(v.shape) for k, v in own.items()} == config["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == config["n_params"]
    # A checkpoint built from the reference shapes alone, wrapped the way the original saved it.
    foreign = {f"module.{k}": torch.zeros(shape) if shape else torch.tensor(0)
               for k, shape in config["state_dict"].items()}
    model.load_state_dict(SLaK.checkpoint_filter_fn({"model": foreign}), strict=True)


def _randomise_batchnorm(model, generator):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            if m.affine:
                m.weight.data.normal_(1, 0.3, generator=generator)
                m.bias.data.normal_(0, 0.3, generator=generator)


@pytest.mark.parametrize("kernel_size,decom,bn", [
    ([13, 11, 9, 7, 3], True, True),     # Decom + small branch
    ([13, 11, 9, 7, 3], False, True),    # K x K + small branch
    ([7, 7, 7, 7, 100], False, True),    # ConvNeXt: no small branch
    ([5, 5, 5, 5, 9], True, True),       # Decom without small branch
    ([13, 11, 9, 7, 3], True, False),    # no BatchNorm
    ([13, 11, 9, 7, 3], False, False),
])
def test_reparameterize_preserves_eval_output(kernel_size, decom, bn, tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = SLaK.SLaK(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], num_classes=5, kernel_size=kernel_size,
                      Decom=decom, bn=bn, layer_scale_init_value=1.0).double()
    _randomise_batchnorm(model, generator)
    model.eval()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64, generator=generator)
    before = model(x)
    model.reparameterize()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for unit in (m for m in model.modules() if isinstance(m, SLaK.LargeKernelUnit)):
        assert not hasattr(unit, "small_conv")
        assert len(list(unit.children())) == (2 if decom else 1)
    after = model(x)
    assert ((after - before).norm() / before.norm()).item() < 1e-5

    # The deploy form saves and loads into a model built with deploy=True.
    path = tmp_path / "deploy.pth"
    torch.save({"model": model.state_dict()}, path)
    reloaded = SLaK.SLaK(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], num_classes=5, kernel_size=kernel_size,
                         Decom=decom, bn=bn, deploy=True).double().eval()
    reloaded.load_state_dict(SLaK.checkpoint_filter_fn(torch.load(path, weights_only=True)), strict=True)
    assert torch.equal(reloaded(x), after)


def test_reparameterize_folds_batchnorms_without_affine_and_refuses_those_without_statistics():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    unit = SLaK.LargeKernelUnit(6, 13, 5, Decom=True).double()
    for branch in (unit.LoRA1, unit.LoRA2, unit.small_conv):
        branch.bn = torch.nn.BatchNorm2d(6, affine=False).double()
    _randomise_batchnorm(unit, generator)  # (only the running statistics: there is no affine)
    unit.eval()
    x = torch.randn(2, 6, 20, 18, dtype=torch.float64, generator=generator)
    before = unit(x)
    unit.reparameterize()
    assert ((unit(x) - before).norm() / before.norm()).item() < 1e-12
    unit = SLaK.LargeKernelUnit(6, 13, 5, Decom=True)
    unit.LoRA1.bn = torch.nn.BatchNorm2d(6, track_running_stats=False)
    with pytest.raises(ValueError, match="without running statistics"):
        unit.reparameterize()


def test_the_paper_families_are_registered():
    assert {"SLaK_tiny", "SLaK_small", "SLaK_base", "SLaK_large"} <= set(SLAK_MODELS)


@pytest.mark.parametrize("name", SLAK_MODELS)
def test_registered_variants_forward_backward(name):
    model = timm.create_model(name, num_classes=3, width_factor=0.125, kernel_size=[7, 5, 5, 3, 3],
                              Decom=True, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    stages = model.forward_stages(x)
    assert [tuple(s.shape[1:]) for s in stages] == [(d, 64 // r, 64 // r) for d, r in
                                                      zip(model.dims, (4, 8, 16, 32))]
    features = model.forward_features(x)   # the last stage's map, as timm's ConvNeXt returns it
    torch.testing.assert_close(features, stages[-1])
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)


def test_width_factor_matches_paper():
    model = SLaK.SLaK(width_factor=1.3, depths=[1, 1, 1, 1], kernel_size=[7, 7, 7, 7, 100])
    assert model.dims == [124, 249, 499, 998]


def test_drop_path_rises_linearly_to_rate():
    model = SLaK.SLaK(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], drop_path_rate=0.3,
                      kernel_size=[7, 7, 7, 7, 100])
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in model.stages for b in stage]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("bad", [[51, 49, 47, 13], [51, 49, 47, 13, 5, 3], [50, 49, 47, 13, 5],
                                 [51, 49, 47, 13, 4], [51, 49, 47, -13, 5], [51, 49, 47, 13, 0]])
def test_kernel_size_validation(bad):
    with pytest.raises(ValueError, match="--kernel_size"):
        SLaK.validate_kernel_size(bad)


def test_pretrained_true_without_a_file_is_a_clear_error():
    with pytest.raises(ValueError, match="no weights are downloaded.*pretrained_cfg_overlay"):
        timm.create_model("SLaK_tiny", pretrained=True)


def test_pretrained_cfg_names_the_original_evaluation_settings():
    model = timm.create_model("SLaK_tiny", width_factor=0.25, kernel_size=[13, 11, 9, 7, 3])
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 1000
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d)
    assert modules[cfg["classifier"]] is model.get_classifier()
    assert timm.data.resolve_data_config({}, model=model)["crop_pct"] == 0.875


@pytest.mark.parametrize("layout", ["ours", "original", "bare"])
def test_timm_pretrained_loads_checkpoint_file(layout, tmp_path):
    import argparse
    kwargs = dict(width_factor=0.25, kernel_size=[13, 11, 9, 7, 3], Decom=True, num_classes=6)
    torch.manual_seed(0)
    source = timm.create_model("SLaK_tiny", **kwargs)
    weights = source.state_dict()
    if layout == "ours":       # what main.py saves: weights under "model", masks, args, optimizer
        checkpoint = {"model": weights, "epoch": 2, "args": {"model": "SLaK_tiny"},
                      "masks": {"x": torch.ones(2, dtype=torch.bool)}}
    elif layout == "original":  # the original release: DDP-prefixed names, a pickled Namespace
        checkpoint = {"model": {f"module.{k}": v for k, v in weights.items()},
                      "args": argparse.Namespace(model="SLaK_tiny"), "epoch": 299}
    else:
        checkpoint = weights
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)

    loaded = timm.create_model("SLaK_tiny", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert loaded.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in loaded.state_dict().items())
    # Fine-tuning to another number of classes: the classifier is left at its initialisation.
    other = timm.create_model("SLaK_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **dict(kwargs, num_classes=3))
    assert other.head.weight.shape == (3, other.num_features)
    assert torch.equal(other.norm.weight, weights["norm.weight"])
    assert torch.equal(other.stages[2][0].large_kernel.LoRA1.conv.weight,
                       weights["stages.2.0.large_kernel.LoRA1.conv.weight"])
    # A model that does not fit the checkpoint (no Decom: other branch names) fails loudly.
    with pytest.raises(RuntimeError, match="lkb_origin"):
        timm.create_model("SLaK_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **dict(kwargs, Decom=False))


def test_aligned_pointwise_layers_compute_the_same():
    """``align_pointwise``: compiled forwards pad the operands of the Linear layers and of the
    stem and downsampling layers (GEMMs over patches in training, channel-padded convolutions in
    eval) to multiples of 8 channels (width 0.3 gives 28, 57, 115 and 230 channels); outputs and
    gradients are the unpadded model's, and the state dict is the same."""
    kwargs = dict(width_factor=0.3, kernel_size=[13, 11, 9, 7, 3], Decom=True, num_classes=5)
    torch.manual_seed(0)
    plain = timm.create_model("SLaK_tiny", align_pointwise=False, **kwargs).double()
    aligned = timm.create_model("SLaK_tiny", **kwargs).double()   # aligned by default
    aligned.load_state_dict(plain.state_dict())
    graphs = []

    def record(gm, example_inputs):   # a backend that runs the traced graph as traced
        graphs.append(gm)
        return gm.forward
    x = torch.randn(2, 3, 72, 72, dtype=torch.float64)   # an odd 9x9 map before stage 4
    out = torch.compile(aligned, backend=record)(x)
    assert any(node.target is torch.nn.functional.pad or "pad" in str(node.target)
               for gm in graphs for node in gm.graph.nodes)
    ref = plain(x)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(aligned.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12), name
    aligned.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(torch.compile(aligned, backend=record)(x), plain(x),
                              rtol=1e-10, atol=1e-12)


def kept_for_backward(output):
    """Bytes of the distinct tensors that autograd keeps for the backward pass of ``output``
    (those of every node that exposes them, a compiled graph's included)."""
    storages, seen, pending = {}, set(), [output.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "saved_tensors", ()) or ():
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        pending.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def test_compiled_training_recomputes_small_branch_instead_of_keeping_it():
    """``recompute_small`` (the default): the compiled step keeps one image-sized tensor per
    unit less for the backward pass (each small branch's convolution output) and computes the
    same loss, gradients and BatchNorm statistics as with it off."""
    torch.manual_seed(0)
    kwargs = dict(width_factor=0.25, kernel_size=[13, 11, 9, 7, 3], Decom=True, num_classes=4,
                  depths=[1, 1, 1, 1])
    models = {on: timm.create_model("SLaK_tiny", **kwargs) for on in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    x = torch.randn(2, 3, 64, 64)
    kept, results = {}, {}
    for on, model in models.items():
        units = [m for m in model.modules() if isinstance(m, SLaK.LargeKernelUnit)]
        for unit in units:
            unit.recompute_small = on
        # Inductor's decompositions and partitioner without its code generation (quicker);
        # static shapes, as other tests' models of other sizes went through the same code.
        loss = torch.compile(model, backend="aot_eager_decomp_partition",
                             dynamic=False)(x).square().sum()
        kept[on] = kept_for_backward(loss)
        loss.backward()
        results[on] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                       {n: b.clone() for n, b in model.named_buffers()})
    small_outputs = sum(x.element_size() * x.shape[0] * unit.small_conv.conv.out_channels *
                        (64 // 4 >> i) ** 2 for i, unit in enumerate(units))
    assert kept[False] - kept[True] == small_outputs
    torch.testing.assert_close(results[True], results[False])
