"""Trainer integrations (issue 13): Lightning, the HF Trainer, timm's NativeScaler loop and a
torchtitan-style optimizer container, each a few real steps against a plain-torch hand loop
(forward, backward, clipping where the trainer clips, × ``ref_plan.scales()``, step).

float64 models keep the comparison free of chaos; no test downloads anything or needs a GPU.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn

DT = torch.float64
TOL = dict(rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- shared helpers
def _lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lenet_bn().to(DT)


def _batches(n: int = 3, bs: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g, dtype=DT), torch.randint(0, 10, (bs,), generator=g))
            for _ in range(n)]


def _hand_loop(net, batches, make_opt, *, loss=None, clip=None, clip_after=False, wd=0.0, scaled=True):
    """The oracle: backward, [clip], weight decay, × scales of a separately prepared plan, step."""
    loss = loss or (lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    ref_plan = fxbackmatch.prepare(net, batches[0][0][:2], compile=False)
    opt = make_opt(net.parameters())
    for b in batches:
        opt.zero_grad()
        loss(net, b).backward()
        if clip is not None and not clip_after:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        sc = ref_plan.scales()
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.grad.add_(p, alpha=wd).mul_(sc[n] if scaled else 1.0)
        if clip is not None and clip_after:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return net


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=n)


def _differs(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.allclose(p, q, rtol=1e-6, atol=1e-9) for p, q in zip(a.parameters(), b.parameters()))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def test_scales_are_far_from_one():
    """The premise of every 'differs' check below: LeNet-BN's scales, prepared as the hand loop
    and the attached plans are (the default conventions), are each at least 1.5× away from 1
    (here 0.07–0.50)."""
    s = fxbackmatch.prepare(_lenet(), _batches(1)[0][0][:2], compile=False).scales()
    assert all(abs(math.log(v)) > math.log(1.5) for v in s.values()), s


# ---------------------------------------------------------------------- Lightning
try:
    import lightning.pytorch as L
except ImportError:  # pragma: no cover - the test extra installs it
    L = None
needs_lightning = pytest.mark.skipif(L is None, reason="needs lightning")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class LitNet(L.LightningModule if L is not None else nn.Module):
    def __init__(self, net: nn.Module, manual: bool = False, adam: bool = False):
        super().__init__()
        self.net = net
        self.automatic_optimization = not manual
        self.adam = adam

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def configure_optimizers(self):
        if self.adam:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return _sgd(self.parameters())


def _fit(lit, batches, callback, **trainer_kwargs):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        callbacks=[callback], **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|does not have many workers).*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        # batch_size=None: the loader yields the prepared batches as they are, in order
        trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


@needs_lightning
def test_lightning_automatic_with_clipping_matches_hand_loop():
    """Automatic optimization (Lightning calls ``opt.step(closure)``): clipping runs inside
    the closure, before the rescale — the hand loop clips raw gradients, then scales."""
    from fxbackmatch.integrations import BackmatchCallback

    net, batches = _lenet(), _batches()
    ref0 = copy.deepcopy(net)
    cb = BackmatchCallback(weight_decay=1e-3, compile=False)  # plan completes from the first self(x)
    trainer = _fit(LitNet(net), batches, cb, gradient_clip_val=0.05)
    ref = _hand_loop(copy.deepcopy(ref0), batches, _sgd, clip=0.05, wd=1e-3)
    _assert_same(net, ref)
    # the clip is active, and its order matters: rescale-then-clip gives other weights
    assert _differs(net, _hand_loop(copy.deepcopy(ref0), batches, _sgd, clip=0.05, clip_after=True, wd=1e-3))
    assert _differs(net, _hand_loop(copy.deepcopy(ref0), batches, _sgd, wd=1e-3))
    # detached at the end of fit
    assert cb.handles == [] and not trainer.optimizers[0]._optimizer_step_pre_hooks


@needs_lightning
def test_lightning_manual_optimization_matches_hand_loop():
    from fxbackmatch.integrations import BackmatchCallback

    net, batches = _lenet(1), _batches(seed=2)
    ref0 = copy.deepcopy(net)
    cb = BackmatchCallback(batches[0][0][:2], module="net", compile=False)
    _fit(LitNet(net, manual=True), batches, cb)
    _assert_same(net, _hand_loop(copy.deepcopy(ref0), batches, _sgd))
    assert _differs(net, _hand_loop(copy.deepcopy(ref0), batches, _sgd, scaled=False))
    assert set(cb.plan.scales()) == {n for n, _ in net.named_parameters()}  # module="net": its names


@needs_lightning
def test_lightning_mode_none_picks_length_for_adam():
    from fxbackmatch.integrations import BackmatchCallback

    seen = {}

    class Spy(BackmatchCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["modes"] = [getattr(h, "mode", "grad") for h in self.handles]

    net, batches = _lenet(), _batches(1)
    _fit(LitNet(net, adam=True), batches, Spy(batches[0][0][:2], module="net", compile=False))
    assert seen["modes"] == ["length"]


# ---------------------------------------------------------------------- Hugging Face Trainer
def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


needs_hf = pytest.mark.skipif(not (_has("transformers") and _has("accelerate")), reason="needs transformers")


class TinyClassifier(nn.Module):
    """A plain torch module as the HF Trainer takes it: ``forward(x, labels=None)`` → dict."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            if torch.is_grad_enabled():
                self.seen.append((x.detach().clone(), labels.clone()))  # the batches the Trainer feeds
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class DictData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g, dtype=DT) * 3
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(model, tmp_path, callback, *, max_grad_norm: float):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=0.05,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, max_grad_norm=max_grad_norm,
        weight_decay=0.0,
    )
    opt = _sgd(model.parameters())
    trainer = Trainer(model=model, args=args, train_dataset=DictData(), optimizers=(opt, None), callbacks=[callback])
    trainer.train()
    return opt


@needs_hf
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_hf_trainer_matches_hand_loop(tmp_path, max_grad_norm):
    """The Trainer clips (``max_grad_norm``) before ``optimizer.step()``: the rescale follows
    the clip. The hand loop replays the batches the model saw (the Trainer shuffles)."""
    from fxbackmatch.integrations import BackmatchTrainerCallback

    torch.manual_seed(0)
    model = TinyClassifier().to(DT)
    ref0 = copy.deepcopy(model)
    cb = BackmatchTrainerCallback(weight_decay=1e-3, compile=False)
    opt = _hf_train(model, tmp_path, cb, max_grad_norm=max_grad_norm)
    batches = model.seen
    assert len(batches) == 3
    clip = max_grad_norm or None
    hand = lambda **kw: _hand_loop(copy.deepcopy(ref0.net), batches, _sgd, clip=clip, wd=1e-3, **kw)  # noqa: E731
    _assert_same(model.net, hand())
    assert _differs(model.net, hand(scaled=False))
    if clip:  # the clip is active, and it runs before the rescale
        assert _differs(model.net, hand(clip_after=True))
        assert _differs(model.net, _hand_loop(copy.deepcopy(ref0.net), batches, _sgd, wd=1e-3))
    assert set(cb.scales()) == {n for n, _ in model.named_parameters()}
    assert cb.handles == [] and not opt._optimizer_step_pre_hooks  # detached at on_train_end


@needs_hf
def test_hf_trainer_default_adamw_gets_length_mode(tmp_path):
    """No optimizers=: the Trainer builds AdamW and hands over accelerate's wrapper."""
    from transformers import Trainer, TrainingArguments

    from fxbackmatch.integrations import BackmatchTrainerCallback

    seen = {}

    class Spy(BackmatchTrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            seen["modes"] = [getattr(h, "mode", "grad") for h in self.handles]
            seen["opt"] = [type(h.optimizer).__name__ for h in self.handles]

    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    Trainer(model=TinyClassifier().to(DT), args=args, train_dataset=DictData(), callbacks=[Spy(compile=False)]).train()
    assert seen == {"modes": ["length"], "opt": ["AdamW"]}


@needs_hf
@needs_lightning
def test_unwrap_optimizer_finds_the_torch_optimizer():
    from accelerate.optimizer import AcceleratedOptimizer
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from fxbackmatch.integrations import unwrap_optimizer

    opt = _sgd(nn.Linear(2, 2).parameters())
    wrapped = AcceleratedOptimizer.__new__(AcceleratedOptimizer)  # its __init__ needs an Accelerator
    wrapped.optimizer = opt
    assert unwrap_optimizer(wrapped) is opt
    assert unwrap_optimizer(LightningOptimizer(opt)) is opt
    box = OptimizersContainer([list(nn.Linear(2, 2).parameters())], _sgd)
    assert unwrap_optimizer(box) is box  # a container with its own step hooks stays itself
    with pytest.raises(TypeError, match="What to do"):
        unwrap_optimizer(object())


def test_split_over_two_optimizers_warns():
    from fxbackmatch.integrations._common import attach_all

    net = _lenet()
    plan = fxbackmatch.prepare(net, _batches(1)[0][0][:2], compile=False)
    a, b = (_sgd(p) for p in _halves(net))
    with pytest.warns(UserWarning, match="split over 2 optimizers"):
        handles = attach_all(plan, [a, b], weight_decay=0.0, mode=None, target="momentum")
    assert len(handles) == 2
    with pytest.raises(ValueError, match="no optimizer holds"):
        attach_all(plan, [_sgd(nn.Linear(2, 2).parameters())], weight_decay=0.0, mode=None, target="momentum")


# ---------------------------------------------------------------------- timm
@pytest.mark.skipif(not _has("timm"), reason="needs timm")
def test_timm_native_scaler_with_clipping_matches_hand_loop():
    """timm's loop: ``NativeScaler`` backward → unscale → ``dispatch_clip_grad`` →
    ``scaler.step(opt)``; the attached pre-hook rescales inside that step, after the clip."""
    import timm.optim
    import timm.utils

    net, batches = _lenet(2), _batches(seed=4)
    ref0 = copy.deepcopy(net)
    make = lambda ps: timm.optim.create_optimizer_v2(  # noqa: E731
        ps, "sgd", lr=0.05, momentum=0.9, weight_decay=0)
    plan = fxbackmatch.prepare(net, batches[0][0][:2], compile=False)
    opt = make(net.parameters())
    plan.attach(opt)
    scaler = timm.utils.NativeScaler(device="cpu")  # a real GradScaler on CPU (loss × 65536)
    for x, y in batches:
        opt.zero_grad()
        scaler(F.cross_entropy(net(x), y), opt, clip_grad=0.05, parameters=net.parameters())
    _assert_same(net, _hand_loop(copy.deepcopy(ref0), batches, make, clip=0.05))
    assert _differs(net, _hand_loop(copy.deepcopy(ref0), batches, make, clip=0.05, clip_after=True))
    assert _differs(net, _hand_loop(copy.deepcopy(ref0), batches, make))  # the clip is active


# ---------------------------------------------------------------------- torchtitan-style container
class OptimizersContainer(torch.optim.Optimizer):
    """Like torchtitan's: one inner optimizer per model part; ``Optimizer.__init__`` over all
    parameters gives the container its own step hooks; ``step()`` steps every inner one."""

    def __init__(self, parts, make):
        self.optimizers = [make(list(p)) for p in parts]
        all_params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        torch.optim.Optimizer.__init__(self, all_params, {})

    def step(self, *args, **kwargs):
        for o in self.optimizers:
            o.step(*args, **kwargs)

    def zero_grad(self, *args, **kwargs):
        for o in self.optimizers:
            o.zero_grad(*args, **kwargs)


def _halves(net):
    ps = list(net.parameters())
    return [ps[: len(ps) // 2], ps[len(ps) // 2:]]


def _run_container(net, batches, attach_to):
    plan = fxbackmatch.prepare(net, batches[0][0][:2], compile=False)
    box = OptimizersContainer(_halves(net), _sgd)
    for o in attach_to(box):
        plan.attach(o)
    for x, y in batches:
        box.zero_grad()
        F.cross_entropy(net(x), y).backward()
        box.step()
    return net


def test_container_attach_matches_hand_loop():
    net, batches = _lenet(3), _batches(seed=5)
    ref0 = copy.deepcopy(net)
    _run_container(net, batches, lambda box: [box])
    _assert_same(net, _hand_loop(copy.deepcopy(ref0), batches, _sgd))
    assert _differs(net, _hand_loop(copy.deepcopy(ref0), batches, _sgd, scaled=False))


def test_container_attach_to_each_inner_optimizer():
    """Each inner optimizer scales its own parameters only (torchtitan-style per-part attach)."""
    net, batches = _lenet(3), _batches(seed=5)
    ref0 = copy.deepcopy(net)
    _run_container(net, batches, lambda box: box.optimizers)
    _assert_same(net, _hand_loop(copy.deepcopy(ref0), batches, _sgd))


@pytest.mark.parametrize("order", ["lower part first", "upper part first"])
def test_inner_optimizers_in_either_order_match_the_hand_loop(order):
    """Attached to each inner optimizer, each part takes the scales the round's first part
    computed from the weights before any part moved: either stepping order equals the hand
    loop (all scales before the step), at a rate where the parts' moves change the factors.
    Before, the part stepping second computed its scales after the first part's update
    (``upper part first``: the lower part's factors saw the upper part's new weights)."""
    net, batches = _lenet(3), _batches(seed=5)
    ref0 = copy.deepcopy(net)
    lr = 0.5
    lower, upper = _halves(net)
    plan = fxbackmatch.prepare(net, batches[0][0][:2], compile=False)
    parts = [lower, upper] if order == "lower part first" else [upper, lower]
    opts = [torch.optim.SGD(p, lr=lr, momentum=0.9) for p in parts]
    for o in opts:
        plan.attach(o)
    for x, y in batches:
        for o in opts:
            o.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for o in opts:
            o.step()
    hand = _hand_loop(copy.deepcopy(ref0), batches, lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9))
    _assert_same(net, hand)
