"""SLaK through timm's model API, in the training and the deployed form: ``features_only`` /
``out_indices``, ``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier`` and
FX feature extraction (timm's own ``tests/test_models.py`` runs in CI: ci/timm_model_tests.sh)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._features import FeatureGetterNet
from timm.models._manipulate import group_parameters
from torchvision.models.feature_extraction import create_feature_extractor

import SLaK  # noqa: F401  registers the SLaK family

# SLaK-T's layout at a tenth of its size: widths 12/24/48/96, Decom with a small branch.
TINY = dict(width_factor=0.125, depths=[1, 1, 2, 1], kernel_size=[7, 5, 5, 3, 3], Decom=True)
FORMS = ["train", "deploy"]
TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def tiny(form="train", seed=0, **kwargs):
    """A tiny SLaK_tiny in eval mode; its BatchNorms have statistics of their own (a few training
    forwards), and the deployed form is the same model after ``reparameterize()``."""
    torch.manual_seed(seed)
    model = timm.create_model("SLaK_tiny", **dict(TINY, **kwargs))
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    model.eval()
    return model.reparameterize() if form == "deploy" else model


@pytest.fixture
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", FORMS)
def test_features_only_maps_match_feature_info_and_the_stages(form, x):
    model = tiny(form)
    expected = model.forward_stages(x)
    assert [f.shape[-1] for f in expected] == [16, 8, 4, 2]

    for out_indices in [None, (1, 3), (0,)]:
        extractor = FeatureGetterNet(copy.deepcopy(model), out_indices=out_indices or (0, 1, 2, 3))
        with torch.no_grad():
            maps = extractor(x)
        chosen = out_indices or (0, 1, 2, 3)
        assert extractor.feature_info.channels() == [f.shape[1] for f in maps] == \
            [model.dims[i] for i in chosen]
        assert extractor.feature_info.reduction() == [4 * 2 ** i for i in chosen]
        for got, i in zip(maps, chosen):
            torch.testing.assert_close(got, expected[i])
        # What is not needed for the maps is gone: no classifier, no final norm, no later stage.
        assert len(extractor.model.stages) == max(chosen) + 1
        assert not any(n.startswith(("head.", "norm.")) for n, _ in extractor.named_parameters())


@pytest.mark.parametrize("deploy", [False, True])
def test_create_model_features_only_with_out_indices(deploy, x):
    torch.manual_seed(0)
    full = timm.create_model("SLaK_tiny", deploy=deploy, **TINY).eval()
    for out_indices, chosen in [(None, [0, 1, 2, 3]), ((1, 3), [1, 3]), ((-1,), [3])]:
        torch.manual_seed(0)   # the same initialisation as ``full``
        extra = {} if out_indices is None else dict(out_indices=out_indices)
        features = timm.create_model("SLaK_tiny", features_only=True, deploy=deploy,
                                     **extra, **TINY).eval()
        with torch.no_grad():
            maps = features(x)
            expected = full.forward_stages(x)
        assert features.feature_info.channels() == [full.dims[i] for i in chosen]
        assert features.feature_info.reduction() == [4 * 2 ** i for i in chosen]
        assert features.feature_info.module_name() == [f"stages.{i}" for i in chosen]
        for got, i in zip(maps, chosen):
            torch.testing.assert_close(got, expected[i], rtol=0, atol=0)
    with pytest.raises(AssertionError, match="out of range"):
        timm.create_model("SLaK_tiny", features_only=True, out_indices=(4,), **TINY)


@pytest.mark.parametrize("form", FORMS)
def test_forward_intermediates_ends_at_forward_features(form, x):
    model = tiny(form)
    with torch.no_grad():
        stages = model.forward_stages(x)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(final, stages[-1], rtol=0, atol=0)
        assert len(intermediates) == 4
        for got, want in zip(intermediates, stages):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        # An int n takes the last n stages; a list takes those stages (negative from the end).
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last_two] == model.dims[2:]
        picked = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        torch.testing.assert_close(picked[1], stages[2], rtol=0, atol=0)
        # Stopping early runs only the stages up to the last one taken.
        early, taken = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early, stages[1], rtol=0, atol=0)
        torch.testing.assert_close(taken[0], stages[1], rtol=0, atol=0)
        # norm=True has nothing to apply: the final LayerNorm follows the pooling.
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[-1], stages[-1], rtol=0, atol=0)
        # The head on forward_features is the model.
        torch.testing.assert_close(model.forward_head(final), model(x))
    with pytest.raises(AssertionError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_grad_checkpointing_keeps_intermediates(x):
    model = tiny()
    with torch.no_grad():
        _, plain = model.forward_intermediates(x)
    model.set_grad_checkpointing(True)
    final, checkpointed = model.forward_intermediates(x.requires_grad_())
    for got, want in zip(checkpointed, plain):
        torch.testing.assert_close(got, want)
    final.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("form", FORMS)
def test_prune_intermediate_layers(form, x):
    model = tiny(form)
    with torch.no_grad():
        stages = model.forward_stages(x)
        logits = model(x)

    kept = copy.deepcopy(model)   # pruning at the last stage without the head keeps the model
    assert kept.prune_intermediate_layers([-1], prune_head=False) == [3]
    with torch.no_grad():
        torch.testing.assert_close(kept(x), logits, rtol=0, atol=0)

    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(pruned.stages) == len(pruned.downsample_layers) == 2
    assert pruned.num_features == pruned.head_hidden_size == model.dims[1]
    assert pruned.num_classes == 0
    with torch.no_grad():   # the model now ends at stage 1's map
        torch.testing.assert_close(pruned(x), stages[1], rtol=0, atol=0)
        torch.testing.assert_close(pruned.forward_features(x), stages[1], rtol=0, atol=0)
    # Every parameter that is left gets a gradient (nothing unused under DDP).
    pruned.train()
    sum(t.sum() for t in pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)).backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]
    # A new classifier on the pruned features.
    pruned.reset_classifier(7, "avg")
    assert pruned.eval()(x).shape == (2, 7)


@pytest.mark.parametrize("form", FORMS)
def test_reset_classifier_and_pooling(form, x):
    model = tiny(form)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.num_features) == (2, model.head_hidden_size)
        torch.testing.assert_close(pooled, F.layer_norm(features.mean((2, 3)), (96,),
                                                        model.norm.weight, model.norm.bias, 1e-6))
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), pooled)
        # No pooling: the LayerNorm (and a classifier) act at every position.
        model.reset_classifier(0, "")
        per_position = F.layer_norm(features.permute(0, 2, 3, 1), (96,), model.norm.weight,
                                    model.norm.bias, 1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(model(x), per_position)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3, 2, 2)
        model.reset_classifier(3, "max")
        torch.testing.assert_close(model.forward_head(features, pre_logits=True),
                                   F.layer_norm(features.amax((2, 3)), (96,), model.norm.weight,
                                                model.norm.bias, 1e-6))
    with pytest.raises(AssertionError, match="global_pool='catavgmax'"):
        model.reset_classifier(3, "catavgmax")
    # The same heads from the factory.
    assert timm.create_model("SLaK_tiny", num_classes=0, **TINY).eval()(x).shape == (2, 96)
    assert timm.create_model("SLaK_tiny", num_classes=0, global_pool="", **TINY).eval()(x).shape == \
        (2, 96, 2, 2)


@pytest.mark.parametrize("form", FORMS)
def test_fx_feature_extraction(form, x):
    model = tiny(form)
    nodes = {f"stages.{i}": f"stage{i}" for i in range(4)}
    with torch.no_grad():
        stages = model.forward_stages(x)
        logits = model(x)
        # torchvision's extractor with timm's leaves (the large-kernel unit stays one call).
        extractor = create_feature_extractor(model, dict(nodes, head="logits"), tracer_kwargs=TRACER)
        out = extractor(x)
        for i in range(4):
            torch.testing.assert_close(out[f"stage{i}"], stages[i])
        torch.testing.assert_close(out["logits"], logits)
        units = [n.target for n in extractor.graph.nodes if n.op == "call_module"
                 and n.target.endswith("large_kernel")]
        assert len(units) == sum(TINY["depths"])
        # timm's FX feature wrapper, and timm's own create_feature_extractor.
        graph_net = timm.models.FeatureGraphNet(model, out_indices=(0, 1, 2, 3))
        for got, want in zip(graph_net(x), stages):
            torch.testing.assert_close(got, want)
        timm_fx = timm.models.create_feature_extractor(model, {"stages.2": "s2"})
        torch.testing.assert_close(timm_fx(x)["s2"], stages[2])
    # Traced in training mode, gradients reach every parameter.
    model.train()
    train_fx = create_feature_extractor(model, {"head": "logits"}, tracer_kwargs=TRACER)
    train_fx(x)["logits"].sum().backward()
    assert not [n for n, p in train_fx.named_parameters() if p.grad is None]


def test_features_only_fx_class(x):
    torch.manual_seed(0)
    features = timm.create_model("SLaK_tiny", features_only=True, feature_cls="fx",
                                 out_indices=(1, 2), **TINY).eval()
    torch.manual_seed(0)
    full = timm.create_model("SLaK_tiny", **TINY).eval()
    with torch.no_grad():
        stages = full.forward_stages(x)
        maps = features(x)
    assert features.feature_info.channels() == [24, 48]
    torch.testing.assert_close(maps[0], stages[1])
    torch.testing.assert_close(maps[1], stages[2])


def test_group_matcher_layers():
    model = timm.create_model("SLaK_tiny", **TINY)
    for coarse, count in [(False, 1 + 5 + 1), (True, 1 + 4 + 1)]:
        groups = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        # stem; each block (or stage), the final norm with the last; classifier
        assert len(set(groups.values())) == count
        assert groups["downsample_layers.0.0.weight"] == 0
        assert groups["head.weight"] == count - 1
        assert groups["norm.weight"] == groups["stages.3.0.pwconv2.weight"] == count - 2
        # a downsampling layer belongs with the first block (the stage) after it
        assert groups["downsample_layers.2.1.weight"] == groups["stages.2.0.pwconv1.weight"]


def test_factory_device_and_dtype():
    model = timm.create_model("SLaK_tiny", device="meta", dtype=torch.float64, **TINY)
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert {t.dtype for t in tensors} == {torch.float64}
    model.reset_classifier(4)
    assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model("SLaK_tiny", not_a_model_arg=1, **TINY)
