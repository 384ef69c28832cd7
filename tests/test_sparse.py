"""Dynamic sparsity (sparse_core.Masking) and FLOPs_counter.py, on tiny CPU models."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

import SLaK
import sparse_core
from conftest import REPO, cli_env, spawn_gloo_processes, torchrun

TARGET = 0.6  # density for --sparsity 0.4


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("kernel_size", [13, 11, 9, 7, 3])
    kwargs.setdefault("Decom", True)
    model = SLaK.SLaK(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=4,
                      layer_scale_init_value=1.0, **kwargs)
    # Channels-last: the CPU computes depthwise weight gradients far faster in that layout.
    return model.to(memory_format=torch.channels_last)


def masking_of(model, optimizer, total_steps, **kwargs):
    """``Masking`` at the tests' settings, ``kwargs`` replacing some."""
    settings = dict(sparsity=1 - TARGET, sparse_init="uniform", growth="random", prune="magnitude",
                    prune_rate=0.3, update_frequency=2, seed=0)
    return sparse_core.Masking(model, optimizer, total_steps, **{**settings, **kwargs})


def batch(seed, n=4, size=32):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 4, (n,), generator=g)


def make(seed=0, total_steps=100, model_kwargs=None, sgd=False, fused=None, **kwargs):
    model = tiny_model(seed, **(model_kwargs or {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True) if sgd \
        else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
    masking = masking_of(model, optimizer, total_steps, **kwargs)
    images, targets = batch(1000 + seed)
    masking.init(images, targets, nn.CrossEntropyLoss())
    return model, optimizer, masking


def assert_masked(model, optimizer, masking, state=True):
    """Weights (and with ``state`` their optimizer state) are zero where masked."""
    params = dict(model.named_parameters())
    for name, mask in masking.masks.items():
        assert mask.dtype == torch.bool
        p = params[name]
        assert torch.all(p[~mask] == 0), name
        for t in optimizer.state.get(p, {}).values() if state else ():
            if torch.is_tensor(t) and t.shape == p.shape:
                assert torch.all(t[~mask] == 0), name


def train(model, optimizer, masking, steps, amp_dtype=None, scaler=None, seed=0, check=True,
          ema=None, overflow_at=()):
    """Engine-like loop: autocast forward, (scaled) backward, step, masking.step(), zero_grad,
    EMA update with the masks (``ema``: a timm ModelEmaV3)."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.CrossEntropyLoss()
    all_stats = []
    for i in range(steps):
        images, targets = batch(seed * 1000 + i)
        with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = criterion(model(images), targets)
        if i in overflow_at:
            loss = loss * float("inf")  # the fp16 scaler must skip this step
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        stats = masking.step()
        optimizer.zero_grad(set_to_none=True)
        all_stats.append(stats)
        if ema is not None:
            masking.update_ema(ema, model)
            if check:
                ema_params = dict(ema.module.named_parameters())
                assert all(torch.all(ema_params[k][~m] == 0) for k, m in masking.masks.items())
        if check:
            assert_masked(model, optimizer, masking, state=False)
    return all_stats


@pytest.mark.parametrize("zero_state", [False, True])
def test_adam_moments_kept_unless_sparse_zero_state(zero_state):
    """Default (the original's): AdamW moments are never masked, they keep accumulating at
    masked positions; ``--sparse_zero_state`` zeroes them wherever masked after every change."""
    model, optimizer, masking = make(update_frequency=2, zero_state=zero_state)
    assert any(train(model, optimizer, masking, 4))
    params = dict(model.named_parameters())
    masked_state = [t[~m] for k, m in masking.masks.items()
                    for t in optimizer.state[params[k]].values()
                    if torch.is_tensor(t) and t.shape == m.shape]
    assert all(torch.all(t == 0) for t in masked_state) == zero_state


def test_sgd_momentum_masked_every_step():
    model, optimizer, masking = make(update_frequency=100, sgd=True)
    params = dict(model.named_parameters())
    for _ in range(2):
        train(model, optimizer, masking, 1)
        for k, m in masking.masks.items():
            assert torch.all(optimizer.state[params[k]]["momentum_buffer"][~m] == 0), k


def test_pruned_and_regrown_weight_keeps_its_value():
    """At an adaptation the weights are masked with the new masks only: a weight pruned and
    regrown in one adaptation keeps its value; one grown from inactive starts at 0."""
    model, optimizer, masking = make(update_frequency=1, growth="gradient", prune_rate=0.9)
    images, targets = batch(5)
    nn.CrossEntropyLoss()(model(images), targets).backward()
    optimizer.step()
    masking.apply_masks()  # what step() does first: the snapshot is the weights it adapts
    before = {k: m.clone() for k, m in masking.masks.items()}
    snapshot = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert masking.step() is not None
    regrown = 0
    for k, p in model.named_parameters():
        if k in masking.masks:
            stayed = masking.masks[k] & before[k]
            assert torch.equal(p[stayed], snapshot[k][stayed]), k
            assert torch.all(p[masking.masks[k] & ~before[k]] == 0), k
            # prune rate 0.9 removes 90% of the active weights: those still active were regrown
            regrown += int(stayed.sum()) - int(0.1 * int(before[k].sum())) - 1
    assert regrown > 0


# ------------------------------------------------------------------------------------ init
@pytest.mark.parametrize("mode", ["snip", "ERK", "uniform"])
def test_init_density_within_half_percent(mode):
    model, optimizer, masking = make(sparse_init=mode)
    params = sparse_core.sparsifiable(model)
    total = sum(p.numel() for p in params.values())
    active = sum((p != 0).sum().item() for p in params.values())
    assert abs(active / total - TARGET) < 0.005
    assert abs(masking.stats()["density"] - TARGET) < 0.005
    assert masking.masks, "some layers must be sparse"
    for name, d in masking.layer_densities().items():
        assert (name in masking.masks) == (d < sparse_core.DENSE_THRESHOLD)
    assert all(m.dtype == torch.bool for m in masking.masks.values())
    assert_masked(model, optimizer, masking)
    # 2-D and 4-D weights only; names as in the state dict.
    assert set(params) <= set(model.state_dict())
    assert all(p.dim() in (2, 4) for p in params.values())


def test_snip_does_not_touch_bn_statistics_or_grads():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    masking = masking_of(model, None, 10, sparse_init="snip")
    masking.init(*batch(0), nn.CrossEntropyLoss())
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_only_L_masks_only_large_kernel_branches():
    model, _, masking = make(sparse_init="ERK", only_L=True)
    assert masking.params and all((".LoRA1.conv." in k or ".LoRA2.conv." in k)
                                  for k in masking.params)
    assert abs(masking.stats()["density"] - TARGET) < 0.005


def test_resume_init_from_zeros():
    model, _, masking = make(sparse_init="snip")
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(model.state_dict())  # a checkpoint with weights only, no masks
    resumed = masking_of(fresh, None, 100, sparse_init="resume")
    resumed.init()
    assert set(resumed.masks) == set(masking.masks)
    assert all(torch.equal(resumed.masks[k], masking.masks[k]) for k in masking.masks)
    assert abs(resumed.stats()["density"] - TARGET) < 0.005
    # A dense checkpoint has nothing to mask.
    dense = masking_of(tiny_model(), None, 100, sparse_init="resume")
    dense.init()
    assert dense.masks == {} and dense.stats()["density"] == 1.0


def test_fit_densities_keeps_budget_and_dense_threshold():
    sizes = {"a": 100, "b": 1000, "c": 10000}
    d = sparse_core.fit_densities({"a": 50.0, "b": 1.0, "c": 0.5}, sizes, 0.5)
    assert d["a"] == 1.0
    assert abs(sum(d[k] * sizes[k] for k in sizes) / sum(sizes.values()) - 0.5) < 1e-9


# ------------------------------------------------------------------------------ prune / grow
def test_prune_and_grow_rules():
    weight = torch.tensor([0.5, -0.1, 0.0, 2.0, -0.3, 0.0])
    mask = torch.tensor([True, True, False, True, True, False])
    pruned = sparse_core.magnitude_prune(weight, mask, 2)
    assert pruned.tolist() == [True, False, False, True, False, False]
    assert mask.tolist() == [True, True, False, True, True, False]  # input untouched
    grad = torch.tensor([9.0, 9.0, 1.0, 9.0, 3.0, -2.0])
    assert sparse_core.gradient_growth(pruned, 2, grad=grad).tolist() == \
        [True, True, False, True, True, False]  # inactive |grad| 9, 1, 3, 2: take 9 and 3
    grown = sparse_core.random_growth(pruned, 3, generator=torch.Generator().manual_seed(0))
    assert grown.sum() == 5 and torch.all(grown[pruned])


def test_a_registered_growth_rule_is_a_choice_and_gets_what_it_names(monkeypatch):
    """A new rule is one function in ``GROWTH``: main.py offers it as ``--growth`` and Masking
    hands it, per adaptation, the inputs its keyword-only arguments name (here the gradients of
    the step just taken, kept for it before the optimizer consumed them)."""
    import main
    seen = []

    def smallest_gradient(mask, n, *, grad):
        seen.append(grad.clone())
        return sparse_core.gradient_growth(mask, n, grad=1.0 / (grad.abs() + 1e-12))
    monkeypatch.setitem(sparse_core.GROWTH, "smallest_gradient", smallest_gradient)
    assert main.get_args_parser().parse_args(["--growth", "smallest_gradient"]).growth == \
        "smallest_gradient"
    model, optimizer, masking = make(growth="smallest_gradient", update_frequency=2)
    assert train(model, optimizer, masking, 2)[-1] is not None
    assert len(seen) == 1 and seen[0].abs().sum() > 0

    def by_weight(mask, n, *, weight):
        return mask
    monkeypatch.setitem(sparse_core.GROWTH, "by_weight", by_weight)
    with pytest.raises(ValueError, match=r"growth rule by_weight takes \['weight'\]"):
        make(growth="by_weight")


@pytest.mark.parametrize("growth", list(sparse_core.GROWTH))
def test_adaptation_is_the_rules_applied_layer_by_layer(growth):
    """An adaptation scores all layers at once; its masks are exactly those of the public
    per-layer rules (magnitude prune, then the growth rule) applied one layer at a time, in
    order, from the same weights, scores and random generator."""
    model, optimizer, masking = make(growth=growth, update_frequency=2)
    train(model, optimizer, masking, 1)
    criterion = nn.CrossEntropyLoss()
    images, targets = batch(77)
    criterion(model(images), targets).backward()
    params = dict(model.named_parameters())
    grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    optimizer.step()
    generator = torch.Generator().set_state(masking.generator.get_state())
    rate = masking.current_prune_rate(masking.steps + 1)
    expected = {}
    for k, mask in masking.masks.items():
        n = min(math.ceil(rate * int(mask.sum())), int(mask.sum()))
        kept = sparse_core.magnitude_prune(params[k].detach(), mask, n)
        score = grads[k] if growth == "gradient" else \
            sparse_core.momentum_score(optimizer, params[k])
        rule, inputs = sparse_core.GROWTH[growth], dict(generator=generator, grad=score,
                                                        momentum=score)
        expected[k] = rule(kept, n, **{name: inputs[name] for name in sparse_core.growth_inputs(rule)})
    before = masking.masks
    assert masking.step() is not None
    assert expected.keys() == masking.masks.keys()
    assert any(not torch.equal(before[k], m) for k, m in masking.masks.items())
    for k, mask in masking.masks.items():
        assert torch.equal(mask, expected[k]), k


@pytest.mark.parametrize("growth", list(sparse_core.GROWTH))
def test_adaptation_counts_and_regrown_start_at_zero(growth):
    model, optimizer, masking = make(growth=growth, update_frequency=3)
    counts = {k: m.sum().item() for k, m in masking.masks.items()}
    before = {k: m.clone() for k, m in masking.masks.items()}
    stats = train(model, optimizer, masking, 2)
    assert stats == [None, None]
    stats = train(model, optimizer, masking, 1, seed=7)[0]
    assert set(stats) >= {"density", "prune_rate", "ever_active"}
    assert abs(stats["density"] - TARGET) < (0.005 if growth == "random" else 0.05)
    # As the original: a layer keeps its count unless fewer inactive positions than it regrows
    # score above 0 (zero gradients at 1x1 maps), then zero-score picks can land on active ones.
    after = {k: m.sum().item() for k, m in masking.masks.items()}
    assert after == counts if growth in ("random", "momentum_neuron") else \
        all(after[k] <= counts[k] for k in counts)
    changed = sum((masking.masks[k] != before[k]).sum().item() for k in counts)
    assert changed > 0
    # Ever active: the initial masks and the adapted ones, exactly.
    assert all(torch.equal(masking.ever_active[k], before[k] | masking.masks[k]) for k in counts)
    union = sum((before[k] | masking.masks[k]).sum().item() for k in counts)
    assert stats["ever_active"] == pytest.approx(union / sum(m.numel() for m in before.values()))
    assert stats["ever_active"] > TARGET
    params = dict(model.named_parameters())
    for k, mask in masking.masks.items():
        grown = mask & ~before[k]
        assert torch.all(params[k][grown] == 0)  # regrown weights start at zero


def test_prune_rate_cosine_decay_and_fix():
    _, _, masking = make(total_steps=100, prune_rate=0.5)
    # The original's schedule: cosine from --prune_rate to a floor of 0.005.
    assert masking.current_prune_rate(0) == pytest.approx(0.5)
    assert masking.current_prune_rate(50) == pytest.approx(0.2525)
    assert masking.current_prune_rate(100) == pytest.approx(0.005)
    model, optimizer, fixed = make(fix=True, update_frequency=1)
    before = {k: m.clone() for k, m in fixed.masks.items()}
    assert train(model, optimizer, fixed, 3) == [None] * 3
    assert all(torch.equal(before[k], fixed.masks[k]) for k in before)


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "fp16 fused"])
def test_pruned_weights_stay_zero(precision):
    # "fp16 fused": the fused AdamW (ours on CUDA), which GradScaler steps even on an overflow,
    # leaving the fused kernel to skip the update.
    model, optimizer, masking = make(update_frequency=2, growth="gradient",
                                     fused=True if precision == "fp16 fused" else None)
    precision = precision.split()[0]
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=precision == "fp16")
    stats, skipped = [], []
    for i in range(5):
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        # fp16: step 2 overflows, the scaler skips it (train() checks the masks after every step).
        stats += train(model, optimizer, masking, 1, amp_dtype, scaler, seed=i,
                       overflow_at=(0,) if precision == "fp16" and i == 1 else ())
        skipped.append(scaler.is_enabled() and scaler.get_scale() < scale)
    if precision == "fp16":
        assert skipped[1]
    # Adaptation every 2 steps; one due on a skipped step (no gradients) moves to the next step.
    expected, pending = [], False
    for t, skip in enumerate(skipped, start=1):
        due = pending or t % 2 == 0
        pending = due and skip
        expected.append(due and not skip)
    assert [s is not None for s in stats] == expected


# ------------------------------------------------------------------------------ state / EMA
def test_state_dict_round_trip_continues_identically(tmp_path):
    model, optimizer, masking = make(update_frequency=2, growth="momentum")
    train(model, optimizer, masking, 3)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "masks": masking.masks, "sparse_state": masking.state_dict()}, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert all(m.dtype == torch.bool for m in ckpt["masks"].values())

    model2 = tiny_model(seed=9)
    model2.load_state_dict(ckpt["model"])
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.05)
    optimizer2.load_state_dict(ckpt["optimizer"])
    masking2 = masking_of(model2, optimizer2, 100, update_frequency=2, growth="momentum")
    masking2.load_masks(ckpt["masks"])
    masking2.load_state_dict(ckpt["sparse_state"])
    assert masking2.steps == 3

    train(model, optimizer, masking, 4, seed=3)
    train(model2, optimizer2, masking2, 4, seed=3)
    assert all(torch.equal(masking.masks[k], masking2.masks[k]) for k in masking.masks)
    assert all(torch.equal(masking.ever_active[k], masking2.ever_active[k]) for k in masking.masks)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_random_growth_is_seeded():
    runs = []
    for _ in range(2):
        model, optimizer, masking = make(update_frequency=2)
        train(model, optimizer, masking, 4, check=False)
        runs.append(masking.masks)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_ema_respects_masks():
    """Masked EMA entries are 0; a newly grown entry (EMA exactly 0) takes the weight's value at
    each update until it is non-zero; the others are the fixed-decay average (no warm-up)."""
    model, optimizer, masking = make(update_frequency=2)
    ema = ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        for e in ema.module.parameters():
            e.add_(1.0)  # an EMA far from the weights: pruned entries must still end at zero
    before = {k: m.clone() for k, m in masking.masks.items()}
    train(model, optimizer, masking, 2, ema=ema)  # adaptation at step 2
    ema_params, params = dict(ema.module.named_parameters()), dict(model.named_parameters())
    grown = {k: m & ~before[k] for k, m in masking.masks.items()}
    for k, mask in masking.masks.items():
        assert torch.all(ema_params[k][~mask] == 0)
        assert torch.equal(ema_params[k][grown[k]], params[k][grown[k]])  # (0: grown at 0)
    old = {k: e.detach().clone() for k, e in ema_params.items()}
    train(model, optimizer, masking, 1, ema=ema)
    for k, mask in masking.masks.items():
        assert torch.equal(ema_params[k][grown[k]], params[k][grown[k]])  # took the weight
        kept = mask & before[k]
        torch.testing.assert_close(ema_params[k][kept], 0.9 * old[k][kept] + 0.1 * params[k][kept])
    head = "head.bias"
    torch.testing.assert_close(ema_params[head], 0.9 * old[head] + 0.1 * params[head].detach())


# ------------------------------------------------------------------------------ DDP (gloo)
def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        calls, changed = [], []
        originals = {n: getattr(torch.distributed, n) for n in ("broadcast", "all_reduce")}

        def counting(name):
            def wrapper(tensor, *args, **kwargs):
                calls.append(name)
                before = tensor.clone()
                out = originals[name](tensor, *args, **kwargs)
                changed.append(not torch.equal(before, tensor))  # did rank 0 overrule this rank?
                return out
            return wrapper

        for name in originals:
            setattr(torch.distributed, name, counting(name))
        model = tiny_model(seed=0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        masking = masking_of(model, optimizer, 100, sparse_init="snip", update_frequency=2)
        masking.init(*batch(100 + rank), nn.CrossEntropyLoss())  # a different batch per rank
        init_calls = len(calls)
        per_step, adapted = [], []
        criterion = nn.CrossEntropyLoss()
        for i in range(7):
            images, targets = batch(10 * i + rank)
            loss = criterion(ddp(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n = len(calls)
            adapted.append(masking.step() is not None)
            per_step.append(len(calls) - n)
        torch.save({"masks": masking.masks, "per_step": per_step, "adapted": adapted,
                    "init_calls": init_calls, "changed": changed,
                    "weights": {k: v.clone() for k, v in model.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_masks_identical_without_per_step_collectives(tmp_path):
    spawn_gloo_processes(_ddp_worker, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pth", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pth", weights_only=True)
    assert r0["adapted"] == [False, True, False, True, False, True, False]
    for r in (r0, r1):
        # One broadcast per mask decision (SNIP densities + masks at init, then one per
        # adaptation), none on the other steps.
        assert r["init_calls"] == 2
        assert r["per_step"] == [1 if a else 0 for a in r["adapted"]]
    # The broadcasts are a safety net: after the SNIP densities (each rank saw another batch),
    # the shared seeded generator and DDP-identical weights already gave rank 1 rank 0's masks.
    assert r1["changed"][0] and not any(r1["changed"][1:])
    assert set(r0["masks"]) == set(r1["masks"])
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    assert all(torch.equal(r0["weights"][k], r1["weights"][k])
               for k in r0["weights"] if "running" not in k and "num_batches" not in k)


# ------------------------------------------------------------------------------ FLOPs counter
def flops_counter(*args):
    result = subprocess.run([sys.executable, str(REPO / "FLOPs_counter.py"), *map(str, args)],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


SLAK_T = ["--model", "SLaK_tiny", "--width_factor", "1.3", "--kernel_size", 51, 49, 47, 13, 5,
          "--Decom", "True", "--sparse", "--sparsity", "0.4", "--sparse_init", "snip"]


@pytest.mark.parametrize("args,params_m,gmacs", [
    (["--model", "SLaK_tiny", "--kernel_size", 7, 7, 7, 7, 100], 29, 4.5),  # ConvNeXt L2S-T
    (SLAK_T, 30, 5.0),
])
def test_flops_counter_reproduces_readme_table(args, params_m, gmacs):
    out = flops_counter(*args)
    assert abs(out["params_M"] / params_m - 1) < 0.02, out
    assert abs(out["gmacs"] / gmacs - 1) < 0.02, out


def test_flops_counter_counts_checkpoint_masks_or_zeros(tmp_path):
    import timm
    import FLOPs_counter
    common = ["--model", "SLaK_tiny", "--width_factor", "0.25", "--kernel_size", 13, 11, 9, 7, 3,
              "--Decom", "true", "--input_size", 32, "--nb_classes", 4]
    torch.manual_seed(0)
    model = timm.create_model("SLaK_tiny", kernel_size=[13, 11, 9, 7, 3], width_factor=0.25,
                              Decom=True, num_classes=4)
    dense_params, dense_macs, _ = FLOPs_counter.count(model, {}, 32)
    masking = masking_of(model, None, 1, sparse_init="uniform")
    masking.init()
    torch.save({"model": model.state_dict(), "masks": masking.masks}, tmp_path / "with_masks.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "zeros.pth")  # the original's format
    with_masks = flops_counter(*common, "--resume", tmp_path / "with_masks.pth")
    zeros = flops_counter(*common, "--resume", tmp_path / "zeros.pth")
    assert with_masks == zeros
    masked_out = sum((~m).sum().item() for m in masking.masks.values())
    assert with_masks["params_M"] == pytest.approx((dense_params - masked_out) / 1e6, abs=1e-3)
    assert with_masks["gmacs"] == pytest.approx(TARGET * dense_macs / 1e9, rel=0.01, abs=1e-3)


# ------------------------------------------------------------------------------ main.py --sparse
SPARSE_CLI = ["--model", "SLaK_tiny", "--width_factor", "0.25", "--Decom", "true",
              "--kernel_size", "13", "11", "9", "7", "3",
              "--data_set", "synthetic", "--device", "cpu", "--input_size", "32", "--nb_classes", "4",
              "--num_workers", "0", "--pin_mem", "false", "--warmup_epochs", "0", "--lr", "2e-3",
              "--drop_path", "0", "--synthetic_val_size", "64", "--disable_eval", "true",
              "--sparse", "--sparsity", "0.4", "--prune_rate", "0.3", "--growth", "random"]


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _run_main(*args):
    from conftest import run_main
    return run_main(*args)


def test_cli_sparse_auto_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    import signal
    import time
    common = [*SPARSE_CLI, "--sparse_init", "snip", "-u", "3", "--epochs", "3", "--batch_size", "16",
              "--synthetic_train_size", "128", "--model_ema", "true", "--model_ema_decay", "0.9"]
    result = _run_main(*common, "--output_dir", tmp_path / "full")
    assert "density" in result.stdout
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), *map(str, common),
                                "--output_dir", str(interrupted)], cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-0.pth").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "checkpoint-2.pth").exists()
    _run_main(*common, "--output_dir", interrupted, "--auto_resume", "true")
    full, resumed = _ckpt(tmp_path / "full" / "checkpoint-2.pth"), _ckpt(interrupted / "checkpoint-2.pth")
    assert full["masks"].keys() == resumed["masks"].keys() and full["masks"]
    assert all(m.dtype == torch.bool for m in full["masks"].values())
    assert all(torch.equal(full["masks"][k], resumed["masks"][k]) for k in full["masks"])
    for key in ("model", "model_ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key]), key
    assert full["sparse_state"]["steps"] == resumed["sparse_state"]["steps"] == 24
    for k, m in full["masks"].items():
        assert torch.all(full["model"][k][~m] == 0) and torch.all(full["model_ema"][k][~m] == 0)


def test_cli_checkpoint_without_masks_resumes_with_sparse_init_resume(tmp_path):
    common = [*SPARSE_CLI, "-u", "4", "--batch_size", "16", "--synthetic_train_size", "64"]
    _run_main(*common, "--sparse_init", "ERK", "--epochs", "1", "--output_dir", tmp_path / "a")
    ckpt = _ckpt(tmp_path / "a" / "checkpoint-0.pth")
    masks = ckpt.pop("masks")
    ckpt.pop("sparse_state", None)
    torch.save(ckpt, tmp_path / "old.pth")  # as the original release saved them: weights only
    result = _run_main(*common, "--sparse_init", "resume", "--epochs", "2", "--resume",
                       tmp_path / "old.pth", "--output_dir", tmp_path / "b")
    assert "init resume" in result.stdout
    resumed = _ckpt(tmp_path / "b" / "checkpoint-1.pth")
    assert resumed["masks"].keys() == masks.keys()
    active = sum(m.sum().item() for m in resumed["masks"].values())
    # Adaptation keeps the counts, less (as the original) regrowth picks that land on active
    # weights where too few inactive ones have a non-zero score.
    assert 0.99 * sum(m.sum().item() for m in masks.values()) <= active <= \
        sum(m.sum().item() for m in masks.values())
    for k, m in resumed["masks"].items():
        assert torch.all(resumed["model"][k][~m] == 0)


def test_cli_two_process_gloo_fp16_sparse_training(tmp_path):
    from conftest import run_main
    out = tmp_path / "out"
    result = run_main(*SPARSE_CLI, "--sparse_init", "snip", "-u", "2", "--growth", "gradient",
                      "--use_amp", "true", "--amp_dtype", "float16", "--model_ema", "true",
                      "--epochs", "1", "--batch_size", "8", "--synthetic_train_size", "64",
                      "--output_dir", out,
                      launcher=torchrun(2))
    assert result.stdout.count("[sparse] init snip") == 1  # rank 0 alone reports
    ckpt = _ckpt(out / "checkpoint-0.pth")
    assert ckpt["sparse_state"]["steps"] == 4 and ckpt["masks"]
    for k, m in ckpt["masks"].items():
        assert torch.all(ckpt["model"][k][~m] == 0) and torch.all(ckpt["model_ema"][k][~m] == 0)
