"""Dynamic sparse training: masks, initial densities, prune/regrow, and their bookkeeping.

``Masking`` keeps one mask per sparsified weight, keyed by the parameter's name in
``model.state_dict()``, as a bitmap on the weight's device (``bitmask.py``; ``masks`` gives
them as bool tensors). Which weights: every 2-D and 4-D parameter (conv and linear weights), or
with ``only_L`` only the large-kernel branch convolutions (``LoRA1``/``LoRA2``, and
``lkb_origin`` for models built without ``Decom``). A layer whose density ends at >= 0.99 is
left dense and gets no mask.

Life cycle (as ``main.py``/``engine.py`` drive it)::

    masking = Masking(model, optimizer, args, total_steps)
    masking.init(images, targets, criterion)     # or masking.load_masks(ckpt["masks"])
    masking.mask_ema(ema.module)                 # the EMA starts masked too
    for each optimizer step:
        scaler.step(optimizer); ...
        stats = masking.step()                   # dict on adaptation steps, else None
        optimizer.zero_grad()
        masking.update_ema(ema, model)           # instead of ema.update(model)

``step()`` re-applies the masks to the weights after every optimizer step, whatever the
precision and also when a fp16 ``GradScaler`` skipped the step; SGD's momentum buffers are
masked with them, as the original does. Adam(W)'s moments are left alone, as the original leaves
them: they keep accumulating at masked positions and a regrown weight starts from that history
(``zero_state=True``, ``--sparse_zero_state``, zeroes all same-shaped optimizer state of masked
and regrown positions whenever the masks change instead).

Every ``update_frequency`` steps (unless ``fix``) each layer removes ``ceil(rate * active)`` of its
active weights with the smallest magnitude and regrows as many among all inactive positions
(just-pruned ones included; ``random``: uniformly at random, ``gradient``: largest |grad| of the
step just taken, ``momentum``: largest |exp_avg / (sqrt(exp_avg_sq) + 1e-8)| under Adam(W) or
|momentum_buffer| under SGD, ``momentum_neuron``: the momentum score, the regrowth shared out
among output neurons in proportion to their mean score). The weights are then masked again, so a
weight pruned and regrown in one adaptation keeps its value and a newly grown one starts at 0.
``rate`` follows a cosine decay from ``args.prune_rate`` to 0.005 over ``total_steps``, one step
of decay per optimizer step before that step's adaptation (the original's schedule).

The EMA (``update_ema``): masked entries are 0, an active entry whose EMA is exactly 0 (newly
grown) takes the weight's value, the others the usual decayed average.

Distributed training: all randomness comes from one generator seeded with ``args.seed`` (the
same on every rank) and the decisions use weights and gradients that DDP keeps identical, so
every rank computes the same masks; as a safety net rank 0's result is broadcast once per mask
decision (once at init and once per adaptation, one packed uint8 tensor), never per step.

The prune and grow rules are small pure functions (tensors in, mask out) in ``PRUNE`` and
``GROWTH``, selected by ``args.prune`` and ``args.growth``.
"""
import itertools
import math

import torch
import torch.distributed as dist

from bitmask import count_set_bits, pack_bits, unpack_bits, zero_unset_
from distributed import get_world_size, is_main_process

__all__ = ["Masking", "PRUNE", "GROWTH", "magnitude_prune", "random_growth", "gradient_growth",
           "momentum_growth", "momentum_neuron_growth", "momentum_score", "erk_densities",
           "fit_densities", "sparsifiable", "DENSE_THRESHOLD", "PRUNE_RATE_FLOOR", "REDISTRIBUTION"]

# A layer whose density would end at or above this is kept dense (no mask).
DENSE_THRESHOLD = 0.99
# The original's prune-rate cosine decay ends here, not at 0.
PRUNE_RATE_FLOOR = 0.005
# Accepted for the original's command lines; its adaptation never redistributed across layers,
# so neither does this one (every name keeps each layer's count).
REDISTRIBUTION = ("none", "momentum", "magnitude", "nonzeros")
_LARGE_KERNEL_BRANCHES = ("LoRA1", "LoRA2", "lkb_origin")


# --------------------------------------------------------------------------------------------
# Prune / grow rules. The selections run on flat tensors holding one or many layers: each
# ``(start, length, n)`` segment is one layer's entries and its count, so that an adaptation
# scores all layers in a few operations and only the per-layer top-k or sort is per layer. The
# rules themselves are small pure functions of one layer (tensors in, mask out).
# --------------------------------------------------------------------------------------------

def _drop_smallest(score, mask, segments):
    """``mask`` without, in each segment, the ``n`` active entries of smallest ``score``."""
    flat = score.detach().float().masked_fill(~mask, float("inf"))
    new = mask.clone()
    for start, length, n in segments:
        if n > 0:
            idx = torch.topk(flat[start:start + length], n, largest=False, sorted=False).indices
            # index_fill_ takes the value as a scalar; ``new[idx] = False`` would copy it to
            # the device first and wait for the GPU, twice per layer per adaptation.
            new[start:start + length].index_fill_(0, idx, False)
    return new


def _add_largest(score, mask, segments):
    """``mask`` plus, in each segment, the ``n`` entries of largest ``|score|`` with active
    entries scored 0.

    As the original: when fewer than ``n`` inactive entries score above 0, the zero-score picks
    (first by position) may be active ones already, and the layer ends with fewer weights.
    """
    flat = score.detach().float().abs().masked_fill_(mask, 0.0)  # abs made a new tensor
    new = mask.clone()
    for start, length, n in segments:
        if n > 0:
            # torch.sort as the original (its tie order among zero scores decides which picks
            # are lost)
            idx = torch.sort(flat[start:start + length], descending=True).indices[:n]
            new[start:start + length].index_fill_(0, idx, True)
    return new


def _one_layer(select, score, mask, n):
    return select(score.reshape(-1), mask.reshape(-1), [(0, mask.numel(), n)]).view(mask.shape)


def magnitude_prune(weight, mask, n):
    """Deactivate the ``n`` active weights of smallest magnitude."""
    return _one_layer(_drop_smallest, PRUNE_SCORE["magnitude"](weight), mask, n)


def random_growth(mask, n, *, generator, **_):
    """Activate ``n`` inactive entries chosen uniformly at random (from ``generator``)."""
    return _one_layer(_add_largest, GROWTH_SCORE["random"](mask, generator=generator), mask, n)


def gradient_growth(mask, n, *, grad, **_):
    """Activate the ``n`` inactive entries with the largest |gradient|."""
    return _one_layer(_add_largest, GROWTH_SCORE["gradient"](mask, grad=grad), mask, n)


def momentum_growth(mask, n, *, momentum, **_):
    """Activate the ``n`` inactive entries with the largest |momentum score|."""
    return _one_layer(_add_largest, GROWTH_SCORE["momentum"](mask, momentum=momentum), mask, n)


def momentum_neuron_growth(mask, n, *, momentum, **_):
    """Momentum growth within output neurons (dim 0 rows).

    Each neuron gets a share of the ``n`` regrown weights proportional to its mean |momentum|
    (largest remainders round, capped by its free slots) and grows its largest-|momentum|
    inactive entries; whatever the caps leave over goes to the largest remaining scores anywhere,
    so the layer keeps its count.
    """
    if n <= 0:
        return mask.clone()
    score = momentum.detach().abs().float().reshape(mask.shape[0], -1)
    inactive = ~mask.reshape(mask.shape[0], -1)
    free = inactive.sum(1)
    share = score.mean(1)
    share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1 / len(share))
    quota_f = share * n
    quota = quota_f.floor().long()
    left = n - int(quota.sum())
    if left > 0:  # largest remainders
        quota[torch.topk(quota_f - quota, left).indices] += 1
    quota = torch.minimum(quota, free)
    ranked = score.masked_fill(~inactive, float("-inf"))
    order = ranked.argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    new = (~inactive) | (inactive & (rank < quota[:, None]))
    new = new.reshape(mask.shape)
    return momentum_growth(new, n - int(new.sum() - mask.sum()), momentum=momentum)


PRUNE = {"magnitude": magnitude_prune}
GROWTH = {"random": random_growth, "gradient": gradient_growth, "momentum": momentum_growth,
          "momentum_neuron": momentum_neuron_growth}
# What each rule ranks, for one layer: the pruned are the active entries of smallest score, the
# grown the largest |score| (momentum_neuron shares its growth out by neuron: no single score).
PRUNE_SCORE = {"magnitude": torch.abs}
GROWTH_SCORE = {
    "random": lambda mask, *, generator, **_: torch.rand(mask.shape, generator=generator,
                                                         device=mask.device),
    "gradient": lambda mask, *, grad, **_: grad.abs(),
    "momentum": lambda mask, *, momentum, **_: momentum.abs(),
}


# --------------------------------------------------------------------------------------------
# Layer densities
# --------------------------------------------------------------------------------------------

def sparsifiable(model, only_L=False):
    """``{name: parameter}`` of the weights that may be sparsified, in ``state_dict`` order."""
    names = set(model.state_dict().keys())
    chosen = {}
    for name, p in model.named_parameters():
        if name not in names or p.dim() not in (2, 4):
            continue
        if only_L and not (name.endswith(".conv.weight")
                           and any(f".{b}." in f".{name}" for b in _LARGE_KERNEL_BRANCHES)):
            continue
        chosen[name] = p
    return chosen


def fit_densities(raw, sizes, target, threshold=DENSE_THRESHOLD):
    """Scale per-layer densities so that their size-weighted mean is ``target``.

    Layers whose scaled density reaches ``threshold`` become dense (1.0) and the others are
    rescaled, repeated until consistent. ``raw`` and ``sizes`` are dicts keyed by layer name.
    """
    budget = target * sum(sizes.values())
    dense = set()
    while True:
        free = [k for k in raw if k not in dense]
        left = budget - sum(sizes[k] for k in dense)
        weight = sum(raw[k] * sizes[k] for k in free)
        scale = left / weight if weight > 0 else 0.0
        newly = {k for k in free if raw[k] * scale >= threshold}
        if not newly or left <= 0:
            break
        dense |= newly
    return {k: 1.0 if k in dense else max(0.0, min(1.0, raw[k] * scale)) for k in raw}


def erk_densities(shapes, target):
    """Erdős–Rényi-Kernel densities: proportional to ``sum(shape) / prod(shape)``."""
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    return fit_densities(raw, sizes, target)


def _random_mask(shape, density, generator, device):
    """A mask with exactly ``round(density * numel)`` entries on, drawn at random."""
    numel = math.prod(shape)
    k = int(round(density * numel))
    score = torch.rand(numel, generator=generator, device=device)
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    if k > 0:
        mask[torch.topk(score, k, sorted=False).indices] = True
    return mask.view(shape)


def _from_rank0(bitmaps):
    """Rank 0's ``bitmaps`` (a list of flat uint8 tensors) on every rank: one broadcast of their
    concatenation, returned as views of it. The bitmaps are an eighth of the bool masks' bytes,
    and splitting them back costs no operation per layer, where an adaptation of SLaK-T has 90."""
    if get_world_size() == 1 or not bitmaps:
        return bitmaps
    packed = torch.cat(bitmaps)
    dist.broadcast(packed, src=0)
    return list(packed.split([b.numel() for b in bitmaps]))


def _byte_aligned(tensors):
    """``tensors`` flattened into one, each starting at a multiple of 8 entries (zeros between):
    the layout in which the layers' bitmaps lie end to end in one buffer."""
    gap = tensors[0].new_zeros(7)
    return torch.cat([piece for t in tensors for piece in (t.reshape(-1), gap[:-t.numel() % 8])])


def _optimizer_state_tensors(optimizer, param):
    """Tensors of ``optimizer``'s state for ``param`` shaped like it (moments, momentum)."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]


def _momentum_buffer(optimizer, param):
    """SGD's momentum buffer of ``param`` ([] when there is none): masked with the weight."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    buf = state.get("momentum_buffer")
    return [buf] if torch.is_tensor(buf) and buf.shape == param.shape else []


def momentum_score(optimizer, param):
    """The original's momentum growth score: exp_avg / (sqrt(exp_avg_sq) + 1e-8) under Adam(W),
    the momentum buffer under SGD; None before the optimizer's first step."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    if "exp_avg" in state and "exp_avg_sq" in state:
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    return state.get("momentum_buffer")


class Masking:
    """Masks and dynamic sparse training for ``model``; see the module docstring.

    Args:
        model: the unwrapped ``nn.Module`` (not the DDP wrapper).
        optimizer: the optimizer over its parameters (its state is masked too).
        args: namespace with ``sparsity``, ``sparse_init``, ``growth``, ``prune``, ``prune_rate``,
            ``update_frequency``, ``fix``, ``only_L``, ``redistribution``, ``verbose``, ``seed``.
        total_steps: optimizer steps of the whole run (the prune-rate cosine decay's length).
    """

    def __init__(self, model, optimizer, args, total_steps):
        self.model, self.optimizer = model, optimizer
        self.density = 1.0 - float(args.sparsity)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
        self.sparse_init = args.sparse_init
        self.growth, self.prune = args.growth, getattr(args, "prune", "magnitude")
        if self.growth not in GROWTH:
            raise ValueError(f"--growth {self.growth}: choose one of {sorted(GROWTH)}")
        if self.prune not in PRUNE:
            raise ValueError(f"--prune {self.prune}: choose one of {sorted(PRUNE)}")
        if getattr(args, "redistribution", "none") not in REDISTRIBUTION + (None,):
            raise ValueError(f"--redistribution {args.redistribution}: choose one of "
                             f"{', '.join(REDISTRIBUTION)}")
        self.zero_state = bool(getattr(args, "sparse_zero_state", False))
        self.prune_rate = float(args.prune_rate)
        self.update_frequency = max(1, int(args.update_frequency))
        self.fix = bool(getattr(args, "fix", False))
        self.verbose = bool(getattr(args, "verbose", False))
        self.total_steps = max(1, int(total_steps))
        self.params = sparsifiable(model, bool(getattr(args, "only_L", False)))
        if not self.params:
            raise ValueError("no weights to sparsify in this model (with --only-L: no "
                             "LoRA1/LoRA2/lkb_origin convolutions)")
        # Bitmaps (``_store``): the masks, and which weights have been active at some point (the
        # "ever active" share of the reports), an eighth of bool masks' memory on the GPU.
        self._bits = self._ever_bits = None
        self._starts, self._mask_bits, self._ever_active_bits = [], {}, {}
        self._active = {}
        self.steps = 0
        self.pending = False  # an adaptation postponed because its step had no gradient
        device = next(iter(self.params.values())).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(getattr(args, "seed", 0)) * 1_000_003 + 12345)
        # Gradient growth reads the gradients just before the optimizer consumes them.
        self._grads = {}
        self._hook = None
        self._use_graph, self._graph, self._graph_key = True, None, None
        self._ema_dirty = True  # masks changed since the last EMA update
        self._ema_zeros = set()  # layers whose EMA had active entries at exactly 0
        if optimizer is not None and self.growth == "gradient" and not self.fix:
            self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)

    # ---------------------------------------------------------------------------- schedule
    def current_prune_rate(self, step=None):
        """The prune rate after ``step`` optimizer steps (default: now): cosine from
        ``prune_rate`` to ``PRUNE_RATE_FLOOR`` over ``total_steps``."""
        t = min(self.steps if step is None else step, self.total_steps)
        return PRUNE_RATE_FLOOR + 0.5 * (self.prune_rate - PRUNE_RATE_FLOOR) * (
            1.0 + math.cos(math.pi * t / self.total_steps))

    def _adapts_at(self, step):
        return not self.fix and step % self.update_frequency == 0 and step <= self.total_steps

    # ---------------------------------------------------------------------------- init
    @torch.no_grad()
    def init(self, images=None, targets=None, criterion=None):
        """Build masks (``args.sparse_init``), zero masked weights, print the density report.

        ``snip`` needs one batch and ``criterion(model(images), targets)``; ``resume`` takes the
        non-zero pattern of the current weights. Returns the report as a dict of scalars.
        """
        shapes = {k: tuple(p.shape) for k, p in self.params.items()}
        sizes = {k: p.numel() for k, p in self.params.items()}
        mode = self.sparse_init
        if mode == "resume":
            masks = {k: p.detach() != 0 for k, p in self.params.items()}
            masks = {k: m for k, m in masks.items()
                     if m.sum().item() < DENSE_THRESHOLD * m.numel()}
        else:
            if mode == "uniform":
                densities = fit_densities({k: 1.0 for k in shapes}, sizes, self.density)
            elif mode == "ERK":
                densities = erk_densities(shapes, self.density)
            elif mode == "snip":
                if images is None or criterion is None:
                    raise ValueError("--sparse_init snip needs a batch and a criterion")
                densities = fit_densities(self._snip_densities(images, targets, criterion),
                                          sizes, self.density)
            else:
                raise ValueError(f"--sparse_init {mode}: choose snip, ERK, uniform or resume")
            masks = {}
            for k, p in self.params.items():
                # Draw for every layer (dense ones too) so the generator advances identically.
                mask = _random_mask(p.shape, densities[k], self.generator, p.device)
                if densities[k] < DENSE_THRESHOLD:
                    masks[k] = mask
        self._store(masks)
        self._count_active()
        self._ema_dirty = True
        self.apply_masks(with_state=self.zero_state)
        stats = self.stats()
        self._report("init " + mode, stats)
        return stats

    def _snip_densities(self, images, targets, criterion):
        """Per-layer share of the globally top-``density`` SNIP saliencies |w * dL/dw|."""
        model = self.model
        buffers = {k: b.clone() for k, b in model.named_buffers()}  # keep BN statistics as they were
        # This full-precision, full-batch pass would otherwise need about twice the memory of a
        # mixed-precision training step: per-block activation checkpointing (timm's
        # set_grad_checkpointing, where the model has it) keeps it below, with the same gradients.
        checkpoint_here = getattr(model, "grad_checkpointing", True) is False and \
            hasattr(model, "set_grad_checkpointing")
        if checkpoint_here:
            model.set_grad_checkpointing(True)
        try:
            with torch.enable_grad():
                loss = criterion(model(images), targets)
                names = list(self.params)
                grads = torch.autograd.grad(loss, [self.params[k] for k in names],
                                            allow_unused=True)
        finally:
            if checkpoint_here:
                model.set_grad_checkpointing(False)
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
        scores = {k: (self.params[k].detach() * g).abs().flatten().float() if g is not None
                  else torch.zeros(self.params[k].numel(), device=self.params[k].device)
                  for k, g in zip(names, grads)}
        flat = torch.cat(list(scores.values()))
        n_keep = int(round(self.density * flat.numel()))
        if n_keep >= flat.numel():
            return {k: 1.0 for k in scores}
        threshold = torch.topk(flat, n_keep, sorted=True).values[-1]
        raw = {k: (s >= threshold).float().mean().item() for k, s in scores.items()}
        if get_world_size() > 1:  # each rank's batch would give other densities: rank 0's
            vec = torch.tensor([raw[k] for k in names], dtype=torch.float64, device=flat.device)
            dist.broadcast(vec, src=0)
            raw = dict(zip(names, vec.tolist()))
        return raw

    # ---------------------------------------------------------------------------- masks
    def _store(self, masks):
        """Keep ``{name: bool mask}`` (rank 0's, under DDP) as bitmaps: one flat buffer holding
        each layer's bits from a byte boundary, ``_mask_bits[name]`` its views, so that an
        adaptation unpacks, packs and stores all layers at once. The "ever active" record
        starts as a copy."""
        sizes = [-(-m.numel() // 8) for m in masks.values()]
        self._starts = [8 * s for s in itertools.accumulate([0] + sizes[:-1])]
        device = next(iter(self.params.values())).device
        packed = pack_bits(_byte_aligned(list(masks.values()))) if masks else \
            torch.zeros(0, dtype=torch.uint8, device=device)
        self._bits = _from_rank0([packed])[0]
        self._ever_bits = self._bits.clone()
        self._mask_bits = dict(zip(masks, self._bits.split(sizes)))
        self._ever_active_bits = dict(zip(masks, self._ever_bits.split(sizes)))

    @property
    def masks(self):
        """``{name: bool mask}`` of the sparse weights: a copy, unpacked from the bitmaps."""
        return {k: self._mask(k) for k in self._mask_bits}

    def _mask(self, name):
        return unpack_bits(self._mask_bits[name], self.params[name].shape)

    def _count_active(self):
        """Cache each mask's active count (adaptation keeps it): one host sync, not one per
        layer."""
        self._active = dict(zip(self._mask_bits, count_set_bits(list(self._mask_bits.values()))))

    @torch.no_grad()
    def apply_masks(self, with_state=False):
        """Zero the masked-out weights and SGD momentum buffers and, ``with_state``, all their
        same-shaped optimizer state (Adam moments too).

        On CUDA the per-step re-masking of the weights (one multiplication per sparse weight)
        is replayed as one CUDA graph (a hundred small kernels would otherwise cost more in
        launches than in work); the graph is recorded again whenever a tensor behind it
        changes.
        """
        tensors, masks = [], []
        for k, mask in self._mask_bits.items():
            p = self.params[k]
            state = _optimizer_state_tensors(self.optimizer, p) if with_state else \
                _momentum_buffer(self.optimizer, p)
            for t in [p] + state:
                tensors.append(t)
                masks.append(mask)
        if not tensors:
            return
        if self._use_graph and tensors[0].is_cuda and \
                not torch.cuda.is_current_stream_capturing():
            key = tuple(t.data_ptr() for t in tensors) + tuple(m.data_ptr() for m in masks)
            if self._graph is None or key != self._graph_key:
                self._graph = self._record(tensors, masks)
                self._graph_key = key
            if self._graph is not None:
                self._graph.replay()
                return
        for t, m in zip(tensors, masks):
            zero_unset_(t, m)

    def _record(self, tensors, masks):
        """A CUDA graph of ``zero_unset_(t, m)`` for all pairs, or None (then eager from now
        on)."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs need
                for t, m in zip(tensors, masks):
                    zero_unset_(t, m)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                for t, m in zip(tensors, masks):
                    zero_unset_(t, m)
            return graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: fall back to eager
            self._use_graph = False
            if is_main_process():
                print(f"[sparse] CUDA graph for re-masking unavailable ({exc}); eager re-masking",
                      flush=True)
            return None

    @torch.no_grad()
    def load_masks(self, masks):
        """Restore masks saved by a checkpoint (``checkpoint['masks']``) and zero masked weights."""
        unknown = sorted(set(masks) - set(self.params))
        if unknown:
            raise ValueError(f"checkpoint masks name weights this run does not sparsify: "
                             f"{unknown[:5]}; use the same --model/--only-L as the run that wrote it")
        loaded = {}
        for k, m in masks.items():
            p = self.params[k]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"checkpoint mask {k} has shape {tuple(m.shape)}, the weight "
                                 f"{tuple(p.shape)}")
            loaded[k] = m.to(device=p.device, dtype=torch.bool)
        self._store(loaded)
        self._count_active()
        self._ema_dirty = True
        self.apply_masks(with_state=self.zero_state)
        self._report("masks restored", self.stats())

    # ---------------------------------------------------------------------------- training
    def _before_optimizer_step(self, optimizer, args, kwargs):
        """Optimizer pre-step hook: keep the gradients gradient growth needs.

        Under float16 AMP they are still multiplied by the loss scale unless ``--clip_grad``
        unscaled them; growth ranks them within each layer, which one scale does not change.
        """
        if not self._mask_bits:
            return
        if self.pending or self._adapts_at(self.steps + 1):
            # GradScaler steps a fused optimizer even when the gradients overflowed, and tells it
            # so through ``found_inf`` (the fused kernel then skips the update): keep nothing, so
            # that the adaptation waits for a step with finite gradients, as for the other
            # optimizers, whose step the scaler skips.
            found_inf = getattr(optimizer, "found_inf", None)
            if found_inf is not None and bool(found_inf):
                return
            self._grads = {k: self.params[k].grad.detach().clone() for k in self._mask_bits
                           if self.params[k].grad is not None}

    def step(self):
        """Call after every optimizer step; returns adaptation stats on adaptation steps."""
        self.steps += 1
        if not self._mask_bits:
            return None
        adapt = self.pending or self._adapts_at(self.steps)
        if adapt and self.growth == "gradient" and not self._grads:
            # The step had no finite gradients (fp16 overflow: the scaler skipped it, or stepped
            # a fused optimizer that skips it itself; the pre-step hook kept none): adapt at the
            # next step.
            self.pending = True
            self.apply_masks()
            return None
        self.apply_masks()
        if not adapt:
            return None
        self.pending = False
        self._adapt()
        self._grads = {}
        stats = self.stats()
        self._report(f"step {self.steps}", stats)
        return stats

    @torch.no_grad()
    def _adapt(self):
        """Prune and regrow every masked layer. All layers are scored at once, in the byte-aligned
        flat layout of the bitmaps; only the selections (a top-k or a sort each) run per layer,
        on the same values as one layer at a time would give them."""
        rate = self.current_prune_rate()
        names = list(self._mask_bits)
        layers = list(zip(names, self._starts))
        mask = unpack_bits(self._bits, (self._bits.numel() * 8,))
        segments = [(start, self.params[k].numel(),
                     min(math.ceil(rate * self._active[k]), self._active[k])) for k, start in layers]
        # At most two all-layer float temporaries live at once (each a copy of the masked
        # weights, 200 MB for SLaK-T's 50.6M): each is freed as the next is made.
        kept = _drop_smallest(PRUNE_SCORE[self.prune](
            _byte_aligned([self.params[k].detach() for k in names])), mask, segments)
        evidence = [self._growth_evidence(k) for k in names]
        if self.growth in GROWTH_SCORE:
            new = _add_largest(_byte_aligned([
                GROWTH_SCORE[self.growth](self._layer(kept, k, start), generator=self.generator,
                                          grad=e, momentum=e)
                for (k, start), e in zip(layers, evidence)]), kept, segments)
        else:  # a rule that is not the ranking of one score (momentum_neuron): layer by layer
            new = kept.clone()
            for (k, start), (_, _, n), e in zip(layers, segments, evidence):
                self._layer(new, k, start).copy_(GROWTH[self.growth](
                    self._layer(kept, k, start), n, generator=self.generator, grad=e, momentum=e))
        synced = _from_rank0([pack_bits(new)] + ([pack_bits(kept)] if self.zero_state else []))
        if self.zero_state:  # opt-in: everything not surviving the prune restarts at zero
            survived = unpack_bits(synced[1], (mask.numel(),))
            for k, start in layers:
                p = self.params[k]
                p.mul_(self._layer(survived, k, start))
                for t in _optimizer_state_tensors(self.optimizer, p):
                    t.mul_(self._layer(survived, k, start))
        self._bits.copy_(synced[0])  # in place: the re-masking CUDA graph reads its views
        self._ever_bits |= synced[0]
        self._count_active()  # growth can fall short of the prune (see _add_largest)
        self.apply_masks()
        self._ema_dirty = True

    def _layer(self, flat, name, start):
        """Layer ``name``'s entries (from ``start``) of a flat all-layers tensor, in its shape."""
        p = self.params[name]
        return flat[start:start + p.numel()].view(p.shape)

    def _growth_evidence(self, name):
        """What growth ranks besides randomness: the gradient (``gradient``) or the momentum
        score (``momentum*``), zeros where there is none yet (an unused weight, no optimizer
        state); None for ``random``."""
        p = self.params[name]
        score = None
        if self.growth == "gradient":
            score = self._grads.get(name)
        elif self.growth.startswith("momentum"):
            score = momentum_score(self.optimizer, p)
        if score is None and self.growth != "random":
            score = torch.zeros_like(p)
        return score

    @torch.no_grad()
    def mask_ema(self, ema_module):
        """Zero the masked-out entries of an EMA copy (its active entries are left as they are)."""
        ema = dict(ema_module.named_parameters())
        for k in self._mask_bits:
            if k in ema:
                ema[k].mul_(self._mask(k).to(ema[k].device))

    @torch.no_grad()
    def update_ema(self, model_ema, model):
        """``model_ema.update(model)`` with the masks: masked entries 0, an active entry whose EMA
        was exactly 0 (newly grown) takes the weight's value, the others the decayed average.

        Entries zero in both the EMA and the masked weights stay exactly zero through the update,
        so only layers whose masks changed, or that still had active zeros, are looked at.
        """
        ema = dict(model_ema.module.named_parameters())
        check = [k for k in self._mask_bits
                 if k in ema and (self._ema_dirty or k in self._ema_zeros)]
        was_zero = {k: ema[k] == 0 for k in check}
        model_ema.update(model)
        self._ema_dirty = False
        if not check:
            return
        still = []
        for k in check:
            e, mask = ema[k], self._mask(k).to(ema[k].device)
            w = self.params[k].detach().to(e.device, e.dtype)
            e.copy_(torch.where(mask, torch.where(was_zero[k], w, e), torch.zeros_like(e)))
            still.append(((e == 0) & mask).any())
        self._ema_zeros = {k for k, z in zip(check, torch.stack(still).tolist()) if z}

    # ---------------------------------------------------------------------------- reports
    @property
    def ever_active(self):
        """``{name: bool mask}`` of the weights that have been active at some point of training."""
        return {k: unpack_bits(b, self.params[k].shape) for k, b in self._ever_active_bits.items()}

    def layer_densities(self):
        """``{name: density}`` of every sparsifiable weight (1.0 for dense ones)."""
        return {k: (self._active[k] / p.numel() if k in self._mask_bits else 1.0)
                for k, p in self.params.items()}

    def stats(self):
        """Overall density, the prune rate now, the share of masked weights ever active."""
        total = sum(p.numel() for p in self.params.values())
        active = sum((self._active[k] if k in self._mask_bits else p.numel())
                     for k, p in self.params.items())
        masked_total = sum(self.params[k].numel() for k in self._mask_bits)
        ever = sum(count_set_bits(list(self._ever_active_bits.values())))
        out = {"density": active / total, "prune_rate": self.current_prune_rate(),
               "ever_active": ever / masked_total if masked_total else 1.0,
               "sparse_layers": float(len(self._mask_bits))}
        if self.verbose:
            out.update({f"density/{k}": d for k, d in self.layer_densities().items()})
        return out

    def _report(self, when, stats):
        if not is_main_process():
            return
        print(f"[sparse] {when}: density {stats['density']:.4f} (target {self.density:.4f}), "
              f"prune rate {stats['prune_rate']:.4f}, ever active {stats['ever_active']:.4f}, "
              f"{len(self._mask_bits)}/{len(self.params)} layers sparse", flush=True)
        if self.verbose:
            for k, d in self.layer_densities().items():
                print(f"[sparse]   {k:60s} {tuple(self.params[k].shape)!s:22s} density {d:.4f}",
                      flush=True)

    # ---------------------------------------------------------------------------- state
    def state_dict(self):
        """Everything but the masks: step counter, ever-active masks, RNG and growth state."""
        return {"steps": self.steps, "pending": self.pending,
                "ever_active": self.ever_active,
                "generator": self.generator.get_state(),
                "ema_zeros": sorted(self._ema_zeros), "ema_dirty": self._ema_dirty,
                "total_steps": self.total_steps, "prune_rate": self.prune_rate,
                "update_frequency": self.update_frequency}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self.pending = bool(state.get("pending", False))
        for k, m in state.get("ever_active", {}).items():
            if k in self.params:
                self._ever_active_bits[k].copy_(pack_bits(m.to(device=self.params[k].device,
                                                                dtype=torch.bool)))
        if "generator" in state:
            try:
                self.generator.set_state(state["generator"].cpu())
            except (RuntimeError, ValueError):  # saved on another device type (CPU <-> CUDA)
                self.generator.manual_seed(int(state["generator"].sum().item()) + self.steps)
        # Layers whose EMA may hold active zeros are looked at on the next EMA update.
        self._ema_zeros = set(state.get("ema_zeros", self._mask_bits))
        self._ema_dirty = bool(state.get("ema_dirty", True))
