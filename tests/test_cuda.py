"""GPU paths: the scales replayed as a CUDA graph (CUDA only) and the few-launch multiply (any device)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxbackmatch
from fxbackmatch.models import lenet_bn




@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.cuda
def test_graphed_scales_follow_weights_statistics_and_new_storage(compile):
    """The graph replays what the plain function computes — after optimizer steps (in-place
    writes), a forward that moves BatchNorm statistics, and a weight given new storage
    (``p.data = …``, which must trigger a new capture)."""
    torch.manual_seed(0)
    net = lenet_bn().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    plan = fxbackmatch.prepare(net, x[:2], compile=compile)
    rt = plan._runtime
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    plan.attach(opt)

    def plain() -> torch.Tensor:
        rt.cuda_graph = False
        try:
            return plan.scale_tensor().clone()
        finally:
            rt.cuda_graph = True

    for step in range(6):
        graphed = plan.scale_tensor()
        assert rt._graphed is not None
        torch.testing.assert_close(graphed, plain(), rtol=1e-12, atol=0)
        if step == 3:
            w = net.conv1.weight if hasattr(net, "conv1") else next(net.parameters())
            first = rt._graphed
            w.data = w.data.clone() * 2
            torch.testing.assert_close(plan.scale_tensor(), plain(), rtol=1e-12, atol=0)
            assert rt._graphed is not first
        opt.zero_grad()
        F.cross_entropy(net(x * (1 + step)), y).backward()
        opt.step()


def _grads_of_every_layout(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, generator=g), torch.randn(5, 7, generator=g),
            torch.randn(4, 6, 2, 2, generator=g).contiguous(memory_format=torch.channels_last),
            torch.randn(7, 5, generator=g).t(),  # dense, transposed strides
            torch.randn(6, 4, generator=g)[:, ::2],  # not dense: multiplied alone
            torch.randn(3, generator=g)]
    return [t.to(device) for t in base]


@pytest.mark.parametrize("budget", [1 << 24, 40], ids=["all-spread", "largest-alone"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_spread_multiply_equals_one_multiply_per_tensor(device, budget, monkeypatch):
    """spread_mul_ against grads[i] * scales[positions[i]], over every layout a gradient can
    have, twice through one cache (the second step reuses the cached layout) — with every
    dense gradient in the buffer, and with a 40-element buffer (the smallest gradients; the
    others multiplied one by one)."""
    from fxbackmatch.runtime import spread as runtime

    monkeypatch.setattr(runtime, "SPREAD_MAX", budget)
    grads = _grads_of_every_layout(device)
    n = len(grads)
    positions = list(range(n))[::-1]  # gradient i takes scale n-1-i
    scales = torch.arange(n, dtype=torch.float32, device=device) + 0.5
    # the second step's scales differ: a buffer kept from the first would be caught
    want = [g.clone() * (n - 1 - i + 0.5) * (2 * (n - 1 - i) + 3) for i, g in enumerate(grads)]
    strides = [g.stride() for g in grads]
    cache: dict = {}
    for step in range(2):
        runtime.spread_mul_(grads, scales if step == 0 else 2 * scales + 2, positions, cache)
    for g, w, st in zip(grads, want, strides):
        assert g.stride() == st
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len(cache) == 1  # one layout, kept for the next step
    spread = next(iter(cache.values()))
    # dense sizes 216, 8, 35, 96, 35, 3 (gradient 5 is not dense: always on its own); a
    # 40-element buffer takes the smallest first: 3 + 8, then 35 does not fit
    if budget > 1000:
        assert (spread.members, spread.total, spread.rest) == ([0, 1, 2, 3, 4, 6], 393, [5])
    else:
        assert (spread.members, spread.total, spread.rest) == ([1, 6], 11, [0, 2, 3, 4, 5])


def test_runtime_spread_multiply_equals_the_per_tensor_path():
    """The runtime's CUDA default (spread multiply), forced on the CPU, rescales exactly as
    the per-tensor path does — on a channels-last model, whose conv gradients are permuted."""
    torch.manual_seed(0)
    net = lenet_bn().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    plan = fxbackmatch.prepare(net, x[:2])
    F.cross_entropy(net(x), torch.arange(8)).backward()
    saved = [p.grad.clone() for p in net.parameters()]
    out = []
    for flat in (False, True):
        for p, g in zip(net.parameters(), saved):
            p.grad = g.clone()
        plan._runtime.flat_multiply = flat
        plan.rescale_grads_()
        out.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    s = plan.scales()
    for (n, p), g in zip(net.named_parameters(), saved):
        torch.testing.assert_close(p.grad, g * s[n], rtol=1e-6, atol=0)


def test_spread_multiply_follows_a_changed_gradient_layout():
    """A cached layout is reused while every gradient keeps its shape and strides, and built
    again (still exact) when one gradient comes back with other strides (channels-last)."""
    from fxbackmatch.runtime import spread as runtime

    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 6, 2, 2, generator=g), torch.randn(5, generator=g)]
    scales = torch.tensor([3.0, 0.5])
    cache: dict = {}
    runtime.spread_mul_(grads, scales, [0, 1], cache)
    first = next(iter(cache.values()))
    runtime.spread_mul_(grads, scales, [0, 1], cache)
    assert next(iter(cache.values())) is first  # the views were not built again
    want = [grads[0].clone() * 3.0, grads[1].clone() * 0.5]
    grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
    runtime.spread_mul_(grads, scales, [0, 1], cache)
    assert next(iter(cache.values())) is not first
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "spread"])
def test_rescale_groups_by_dtype_and_skips_missing_and_other_optimizers_grads(flat):
    """rescale_ with ``only`` (one optimizer's parameters) over three steps whose gradients
    change pattern — all float32; then three in float64 and one missing; then all float32
    again (the groups kept for the first pattern are right again): each present gradient in
    ``only`` is multiplied by its scale, the rest untouched — against the plain product."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4), torch.nn.ReLU(),
                              torch.nn.Linear(4, 3))
    plan = fxbackmatch.prepare(net, torch.randn(2, 6))
    plan._runtime.flat_multiply = flat
    s = plan.scales()
    params = dict(net.named_parameters())
    g = torch.Generator().manual_seed(2)
    saved = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    only = {id(params[n]) for n in ("0.weight", "2.weight", "2.bias", "4.weight")}
    wide = ("2.weight", "4.weight", "4.bias")
    for mixed in (False, True, False):
        for n, p in params.items():
            p.data = p.data.double() if mixed and n in wide else p.data.float()
            p.grad = None if mixed and n == "2.bias" else saved[n].to(p.dtype, copy=True)
        plan.rescale_grads_(only)
        for n, p in params.items():
            if mixed and n == "2.bias":
                assert p.grad is None
                continue
            assert p.grad.dtype == (torch.float64 if mixed and n in wide else torch.float32)
            want = saved[n].to(p.grad.dtype) * (s[n] if id(p) in only else 1.0)
            torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0)
        for p in params.values():
            p.grad = None


def test_spread_cache_keeps_a_bounded_number_of_layouts(monkeypatch):
    """Gradients that come and go (a different subset each step) give a new layout each time.
    Five subsets in turn fit the cache (each kept, the buffers reused, with new scales every
    step); with room for four, the least recently used is dropped and each step builds its
    layout again — exact every step either way."""
    from fxbackmatch.runtime import spread as runtime

    g = torch.Generator().manual_seed(3)
    full = [torch.randn(5, 3, generator=g) for _ in range(6)]

    def steps(n: int, cache: dict) -> list[int]:
        sizes, built = [], []
        for step in range(n):
            scales = torch.arange(1.0, 7.0) + step
            pos = [k for k in range(6) if (k + step) % 5]  # five different subsets, in turn
            grads = [full[k].clone() for k in pos]
            before = set(map(id, cache.values()))
            runtime.spread_mul_(grads, scales, pos, cache)
            for k, got in zip(pos, grads):
                torch.testing.assert_close(got, full[k] * scales[k], rtol=0, atol=0)
            sizes.append(len(cache))
            built.append(not set(map(id, cache.values())) <= before)
        return sizes, built

    sizes, built = steps(10, {})
    assert sizes == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5] and built == [True] * 5 + [False] * 5
    monkeypatch.setattr(runtime, "SPREAD_LAYOUTS", 4)
    sizes, built = steps(10, {})
    assert sizes == [1, 2, 3, 4] + [4] * 6 and all(built)  # five in turn through four places
    monkeypatch.setattr(runtime, "SPREAD_LAYOUTS", 8)
    monkeypatch.setattr(runtime, "SPREAD_CACHED", 3 * 5 * 15)  # room for three 5-gradient buffers
    sizes, _ = steps(10, {})
    assert max(sizes) == 3


@pytest.mark.parametrize("rule", ["backmatch", "lars"])
def test_rescale_inside_a_compiled_function_has_no_graph_break(rule):
    """Traced by dynamo (an optimizer hook inside a compiled training step), the plan's identity
    check and rescale_ read with plain loops, and the gradients are multiplied one by one even
    where the spread multiply is asked for (its buffer would outlive the compiled region): no
    graph break (dynamo's own counter; the C-level maps broke twice), the product right, no
    buffer kept."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    # compile=False: the identity check and rescale_'s loops alone (the compiled factor
    # function traced in a caller's region: test_first_rescale_inside_a_compiled_region_...)
    plan = fxbackmatch.prepare(net, torch.randn(2, 6), compile=False, rule=rule)  # lars: which grads it left
    plan._runtime.flat_multiply = True
    net(torch.randn(4, 6)).sum().backward()
    saved = {n: p.grad.clone() for n, p in net.named_parameters()}
    s = plan.scales()
    counters.clear()
    torch.compile(plan.rescale_grads_, backend="eager")()
    assert not counters["graph_break"], dict(counters["graph_break"])
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, saved[n] * s[n], rtol=1e-6, atol=0)
    assert plan._runtime._spread_cache == {}


def _wrapped_compile(monkeypatch) -> None:
    """``torch.compile`` behind a plain Python wrapper, as ``import lightning`` leaves it
    (``lightning.fabric.wrappers._capture_compile_kwargs``): dynamo does not know the wrapper, so
    a call of it inside a traced region breaks the graph."""
    import functools

    compile_fn = torch.compile

    @functools.wraps(compile_fn)
    def wrapper(*args, **kwargs):
        return compile_fn(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", wrapper)


def test_first_rescale_inside_a_compiled_region_builds_nothing_there(monkeypatch):
    """A compiled plan's first rescale, traced inside the caller's compiled region (a compiled
    optimizer step, before any eager step), used to build its compiled factor function there:
    under a wrapped ``torch.compile`` one graph break (dynamo's counter; none on the same code
    with torch's own). Now the generated function is inlined, nothing is cached, and the next
    eager call builds the compiled one; the products match the scales computed eagerly."""
    from torch._dynamo.utils import counters

    _wrapped_compile(monkeypatch)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    plan = fxbackmatch.prepare(net, torch.randn(2, 6))
    net(torch.randn(4, 6)).sum().backward()
    saved = {n: p.grad.clone() for n, p in net.named_parameters()}
    counters.clear()
    torch.compile(plan.rescale_grads_, backend="eager")()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert plan._runtime._fn is None  # built at the first eager call, not inside the trace
    s = plan.scales()  # the eager reference
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, saved[n] * s[n], rtol=1e-6, atol=0)
    plan.rescale_grads_()  # eagerly: builds the compiled function, multiplies again
    assert plan._runtime._fn is not None
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, saved[n] * s[n] ** 2, rtol=1e-6, atol=0)


def test_length_mode_inside_a_compiled_step_under_a_wrapped_compile(monkeypatch):
    """``attach(mode="length")``'s compiled per-tensor kernel is built lazily too: traced in a
    compiled ``opt.step`` before it exists, the function itself is inlined. Under a wrapped
    ``torch.compile`` the step then breaks its graph exactly where torch's AdamW alone does
    (its own ``graph_break()``; the code before broke twice more), with no warning from dynamo,
    and matches an eager step from the same state."""
    import copy
    import warnings

    from torch._dynamo.utils import counters

    from fxbackmatch.apply import length

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40))
    x = torch.randn(8, 64)
    twin = copy.deepcopy(net)

    def one_step(model, compiled: bool, attach: bool = True) -> int:
        plan = fxbackmatch.prepare(model, x[:2])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if attach:
            plan.attach(opt, mode="length")
        model(x).square().mean().backward()
        counters.clear()
        (torch.compile(opt.step, backend="eager") if compiled else opt.step)()
        return sum(counters["graph_break"].values())

    monkeypatch.setattr(length, "SMALL", 1)  # every tensor through the compiled kernel
    monkeypatch.setattr(length, "_COMPILED", [])
    _wrapped_compile(monkeypatch)
    torch._dynamo.reset()
    own = one_step(copy.deepcopy(net), True, attach=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dynamo's warnings (a traced cache wrapper) among them
        assert one_step(net, True) == own >= 1
    assert length._COMPILED == []  # built at the first eager step, not inside the trace
    one_step(twin, False)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
def test_the_fused_sgd_step_on_cuda_is_the_foreach_step_and_trains_like_attach():
    """On CUDA ``compile_step`` over SGD is ``cuda_update.SGDForeachStep``: the graphed scales,
    the spread multiply and torch's fused SGD kernel. In float64 (no TF32 convolutions, so the
    twins' one-ulp differences between torch's fused and foreach kernels do not compound),
    with Nesterov, weight decay and a weight halved by hand at step 3: weights, momentum
    buffers and scales equal attach() + ``optimizer.step()`` on a twin to 1e-9, with the
    scales' CUDA graph in use. Then float32 channels-last twins (bench_rescale's layout),
    one step from the same state, the fused step's learning rate a float64 CUDA tensor (the
    kernel reads float32): to 1e-5, on torch's fused kernel. Eager plans: the graph captures
    the eager factor function, and the device script's tests have 60 s in all."""
    import copy

    from fxbackmatch.apply.cuda_update import SGDForeachStep

    def twins(dtype, fmt, lr=0.05):
        torch.manual_seed(0)
        a = lenet_bn().cuda().to(dtype=dtype, memory_format=fmt)
        b = copy.deepcopy(a)
        x = torch.randn(16, 3, 32, 32, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        pa, pb = (fxbackmatch.prepare(n, x[:2], compile=False) for n in (a, b))
        oa = torch.optim.SGD(a.parameters(), lr=lr, momentum=0.9, nesterov=True)
        ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        step = pa.compile_step(oa, weight_decay=5e-4)
        pb.attach(ob, weight_decay=5e-4)
        return (a, pa, oa, step), (b, pb, ob), x

    def check(a, oa, b, ob, tol):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol * float(q.abs().max()))
            u, v = oa.state[p]["momentum_buffer"], ob.state[q]["momentum_buffer"]
            torch.testing.assert_close(u, v, rtol=tol, atol=tol * float(v.abs().max()))

    y = torch.randint(0, 10, (16,), device="cuda")
    (a, pa, oa, step), (b, pb, ob), x = twins(torch.float64, torch.contiguous_format)
    for i in range(6):
        if i == 3:
            with torch.no_grad():
                for n in (a, b):
                    next(n.parameters()).mul_(0.5)
        for net, st in ((a, step), (b, ob.step)):
            net.zero_grad()
            F.cross_entropy(net(x * (1 + i)), y).backward()
            st()
        assert isinstance(step._fn, SGDForeachStep) and pa._runtime._graphed is not None
        check(a, oa, b, ob, 1e-9)
        torch.testing.assert_close(pa.applied_scales(), pb.applied_scales(), rtol=1e-9, atol=0)
    (a, pa, oa, step), (b, pb, ob), x = twins(torch.float32, torch.channels_last,
                                              torch.tensor(0.05, dtype=torch.float64, device="cuda"))
    for net, st in ((a, step), (b, ob.step)):
        F.cross_entropy(net(x), y).backward()
        st()
    assert step._fn.fused == [True]  # the channels-last weights, gradients and buffers agree in strides
    check(a, oa, b, ob, 1e-5)


@pytest.mark.cuda
def test_length_mode_on_cuda_spreads_its_lerp_weights_and_steps_as_the_per_tensor_lerp(monkeypatch):
    """On CUDA ``attach(mode="length")`` takes the few-launch foreach core by default (spread
    lerp weights; never the compiled per-tensor kernel, even under a compiled plan): four
    float64 AdamW steps equal a twin's per-tensor lerp (``flat=False``) bitwise, on a
    channels-last conv weight."""
    import copy

    from fxbackmatch.apply import length

    monkeypatch.setattr(length, "_compiled_step_one", lambda: pytest.fail("the compiled kernel ran"))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # twins' gradients bitwise equal
    torch.manual_seed(0)
    a = lenet_bn().cuda().double()
    a[0].weight.data = a[0].weight.data.contiguous(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    x = torch.randn(16, 3, 32, 32, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 10, (16,), device="cuda")
    pa = fxbackmatch.prepare(a, x[:2], compile=False)
    pa.compile = True  # the choice reads the plan's flag; the scales stay eager (no inductor here)
    pb = fxbackmatch.prepare(b, x[:2], compile=False)
    oa, ob = (torch.optim.AdamW(n.parameters(), lr=2e-3, weight_decay=0.01) for n in (a, b))
    ha, hb = pa.attach(oa, mode="length"), pb.attach(ob, mode="length")
    hb.flat = False
    for _ in range(4):
        for net, o in ((a, oa), (b, ob)):
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
            o.step()
    assert ha._spread and not hb._spread
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class _Fake:
    """A stand-in for a captured graph: which key it was built for."""

    def __init__(self, key):
        self.key = key


def _run(cache, keys) -> list[str]:
    """What the cache does for each key in turn: replay (``r``), capture (``c``), plain (``-``)."""
    out = []
    for k in keys:
        before = cache.captures
        g = cache.lookup(k, lambda k=k: _Fake(k))
        assert g is None or g.key == k  # never another layout's graph
        out.append("-" if g is None else "c" if cache.captures > before else "r")
    return "".join(out)


def test_capture_cache_captures_recurring_layouts_and_stops_where_none_recur(caplog):
    """CaptureCache's policy, against the sequences worked out by hand: a layout is captured at
    its second sighting and replayed after; two alternating layouts (two optimizers) both
    get a graph; the least recently used graph is dropped past ``keep``; addresses that never
    repeat stop it after ``patience`` calls; captures that are not replayed enough stop it;
    a failing capture stops it with a warning."""
    from fxbackmatch.runtime.graphs import CaptureCache

    assert _run(CaptureCache(), "aaaaa") == "-crrr"
    assert _run(CaptureCache(), "ababab") == "--ccrr"
    c = CaptureCache(keep=2)
    assert _run(c, "aabbccaa") == "-c-c-c-c"  # c's graph pushed a's out: a is seen again, then captured
    assert list(c.graphs) == ["c", "a"]
    c = CaptureCache(patience=5)
    assert _run(c, "abcdefaa") == "-----" + "---" and not c.enabled
    c = CaptureCache(patience=4)  # patience counts from the last replay or capture
    assert _run(c, "aabcaaadefgha") == "-c--rrr" + "----" + "--" and not c.enabled
    c = CaptureCache(max_captures=2, min_replays=3, keep=1)
    # a and b captured and replayed once each (b's graph pushed a's out); a's new capture is
    # refused: 2 captures replayed 2 times, under 3 each
    assert _run(c, "aaabbbaa") == "-cr-cr--" and not c.enabled
    c = CaptureCache()

    def fail():
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level("WARNING", logger="fxbackmatch.runtime.graphs"):
        assert c.lookup("a", fail) is None and c.lookup("a", fail) is None
    assert not c.enabled and "capture of the rescale failed" in caplog.text
    assert c.lookup("a", lambda: _Fake("a")) is None  # off for good


def test_rescale_key_sees_every_change_a_graph_cannot_follow():
    """rescale_key differs whenever a replay would read or write the wrong memory: a weight or
    gradient at another address, a gradient with other strides, dtype or shape at the same
    address, a target losing its gradient; and is equal for the same tensors again."""
    from fxbackmatch.runtime.graphs import rescale_key

    w = [torch.randn(4, 3), torch.randn(4)]
    base = torch.randn(24)
    grads = [base[:12].view(4, 3), base[12:16]]
    k = rescale_key(w, [], grads)
    assert rescale_key(w, [], list(grads)) == k
    assert rescale_key([w[0].clone(), w[1]], [], grads) != k
    assert rescale_key(w, [], [grads[0].clone(), grads[1]]) != k
    assert rescale_key(w, [], [base[:12].view(3, 4).t(), grads[1]]) != k  # same address, other strides
    assert rescale_key(w, [], [base[:12].view(2, 6), grads[1]]) != k  # same address, other shape
    assert rescale_key(w, [], [grads[0], base[12:14].view(torch.float64)]) != k  # same address, other dtype
    assert rescale_key(w, [], [grads[0], None]) != k
    assert rescale_key(w, [], [None, grads[0]]) != rescale_key(w, [], [grads[0], None])


@pytest.mark.parametrize("impl", ["tensor_guards", "python"])
def test_input_guard_refuses_whatever_the_key_refuses(impl, monkeypatch):
    """InputGuard (the check a step makes before building rescale_key) against rescale_key as
    the oracle: it accepts the same tensors again and refuses every change the key sees — a
    copy elsewhere, another shape, strides or dtype at the same address, a missing or sparse
    gradient, a tensor re-strided in place — with dynamo's C++ check or the Python fallback;
    and it is stricter where the key is blind (``requires_grad``), never looser."""
    from fxbackmatch.runtime import graphs

    if impl == "python":
        monkeypatch.setattr(graphs, "_TensorGuards", None)
    w = [torch.randn(4, 3), torch.randn(4)]
    base = torch.randn(24)
    grads = [base[:12].view(4, 3), base[12:16]]
    guard = graphs.InputGuard([*w, *grads])
    assert (guard._check.__name__ == "<lambda>") == (impl == "python")

    def key(ts):
        return graphs.rescale_key(ts[:2], [], ts[2:])

    other = torch.randn(12)
    variants = {
        "same": [*w, *grads],
        "clone": [*w, grads[0].clone(), grads[1]],
        "weight moved": [w[0].clone(), w[1], *grads],
        "strides": [*w, base[:12].view(3, 4).t(), grads[1]],
        "shape": [*w, base[:12].view(2, 6), grads[1]],
        "dtype": [*w, grads[0], base[12:14].view(torch.float64)],
    }
    for name, ts in variants.items():
        assert guard(ts) == (key(ts) == key(variants["same"])), name
    assert guard([*w, *grads]) and not guard([*w, grads[0], None]) and not guard([*w, grads[0]])
    assert not guard([*w, grads[0], grads[1].to_sparse()])
    g = other.view(4, 3)
    guard2 = graphs.InputGuard([g])
    assert guard2([g])
    g.as_strided_((3, 4), (4, 1))  # the same tensor object, re-strided in place
    assert not guard2([g]) and graphs.rescale_key([], [], [g]) != graphs.rescale_key([], [], [other.view(4, 3)])
    frozen = [w[0].detach().requires_grad_(True), w[1], *grads]  # same address and metadata
    assert key(frozen) == key(variants["same"]) and guard(frozen) == (impl == "python")
    # a tensor listed twice (a weight two atoms read): accepted again; a repeat that is another
    # tensor at the same address with other metadata is refused, as by the key
    twice = graphs.InputGuard([w[0], w[1], w[0], *grads])
    assert twice([w[0], w[1], w[0], *grads]) and twice.unique == [0, 1, 3, 4]
    assert not twice([w[0], w[1], w[0].view(3, 4), *grads])
    assert twice([w[0], w[1], w[0], *grads]) is True  # and the same again: no state kept


@pytest.mark.parametrize("impl", ["tensor_guards", "python"])
def test_graph_rescale_replays_the_last_graph_without_building_the_key(impl, monkeypatch):
    """The runtime's path with ``graph_rescale``, on the CPU with the capture replaced by an
    eager replay of the same body: a step checks the last replayed graph (InputGuard) and
    builds rescale_key only where that fails. Nine steps of zeroed gradients, worked by hand:
    0 seen, 1 captured, 2–3 replayed without the key (a smaller batch at 3: another span
    multiplier, same graph), 4 a gradient with new storage (plain), 5 its layout captured, 6
    replayed, 7 a weight's ``requires_grad`` off (dynamo's check refuses, the key finds the
    graph: guarded anew), 8 it is back on (the same again); 9 the last target has no gradient (plain),
    10 that layout captured, 11 replayed, 12 the gradient is back (the key finds the graph of
    steps 5–8), 13 replayed. Every step the gradients equal their saved values times
    ``plan.scales()``; with dynamo's C++ check and with the Python fallback."""
    from fxbackmatch.runtime import chain, graphs

    if impl == "python":
        monkeypatch.setattr(graphs, "_TensorGuards", None)
    torch.manual_seed(0)
    net = lenet_bn()
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    plan = fxbackmatch.prepare(net, x[:2], compile=False)
    rt = plan._runtime
    assert rt.multiplier is not None  # the default conventions: the span multiplier inside the graph
    rt.graph_rescale = True
    n = len(rt.targets)

    def eager_capture(body):
        out = torch.empty(n, dtype=torch.float64)

        class Eager:
            def replay(self):
                out.copy_(body())
        return Eager(), out

    keys = []

    def counted_key(*args):
        keys.append(1)
        return graphs.rescale_key(*args)

    class EagerScales:  # the scales' own graph (capturable now says yes to it too), run eagerly
        def __init__(self, fn, weights, stats, consts):
            self.run = lambda: fn(weights, [], stats, consts)

        def matches(self, weights, stats):
            return True

        def __call__(self):
            return self.run()

    monkeypatch.setattr(chain, "capturable", lambda dev: True)
    monkeypatch.setattr(chain, "GraphedScales", EagerScales)
    monkeypatch.setattr(graphs, "_warm", lambda *args: None)
    monkeypatch.setattr(graphs, "_capture", eager_capture)
    monkeypatch.setattr(chain, "rescale_key", counted_key)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    w, last = next(net.parameters()), rt.targets[-1]
    seen = []
    for step in range(14):
        net.zero_grad(set_to_none=False)
        b = 4 if step == 3 else 16
        F.cross_entropy(net(x[:b] * (1 + 0.1 * step)), y[:b]).backward()
        if step == 4:
            w.grad = w.grad.clone()
        if step == 7:
            w.requires_grad_(False)
        if step in (9, 10, 11):
            kept, last.grad = last.grad, None
        saved = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
        s = plan.scales()
        before = rt._rescale_graphs.captures, rt._rescale_graphs.hits, len(keys)
        plan.rescale_grads_()
        c, h, k = (a - b for a, b in zip((rt._rescale_graphs.captures, rt._rescale_graphs.hits, len(keys)), before))
        seen.append("c" if c else ("r" if k == 0 else "R") if h else "-")
        assert len(saved) == (len(rt.targets) - 1 if step in (9, 10, 11) else len(rt.targets))
        for name, p in net.named_parameters():
            if name in saved:
                torch.testing.assert_close(p.grad, saved[name] * s[name], rtol=1e-6, atol=0, msg=f"step {step}, {name}")
        w.requires_grad_(True)
        if step in (9, 10, 11):
            last.grad = kept  # the same tensor back: at step 12 the key finds the graph of steps 5–8
        opt.step()
    # r: replayed on the guard alone; R: replayed after the key found it. The Python fallback
    # does not compare requires_grad (nor does the key): steps 7 and 8 replay on it alone
    rg = "RR" if impl == "tensor_guards" else "rr"
    assert "".join(seen) == "-crr-cr" + rg + "-cr" + "Rr"
    assert (rt._rescale_graphs.captures, rt._rescale_graphs.hits, len(keys)) == (3, 8, 9 if rg == "RR" else 7)


def test_graph_rescale_off_cuda_is_the_plain_rescale():
    """``graph_rescale`` asks for a graph only on CUDA: on the CPU the rescale is the plain one
    (the product of each gradient and its scale) and the capture cache is never consulted."""
    torch.manual_seed(0)
    net = lenet_bn()
    x = torch.randn(8, 3, 32, 32)
    plan = fxbackmatch.prepare(net, x[:2])
    plan._runtime.graph_rescale = True
    F.cross_entropy(net(x), torch.arange(8)).backward()
    saved = {n: p.grad.clone() for n, p in net.named_parameters()}
    s = plan.scales()
    plan.rescale_grads_()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, saved[n] * s[n], rtol=1e-6, atol=0)
    assert plan._runtime._rescale_graphs.calls == 0


@pytest.mark.cuda
@pytest.mark.parametrize("conventions", ["default", "paper"])
def test_graphed_rescale_multiplies_as_the_plain_product_and_follows_moved_gradients(conventions):
    """With ``graph_rescale``, six steps of zeroed-not-freed gradients: step 0 plain, step 1
    captures, steps 2–3 replay; at step 4 one gradient gets new storage (plain again), step 5
    captures that layout. Every step the gradients equal their saved values times
    ``plan.scales()`` (the plain path) — weights moved in place by SGD between steps, BatchNorm
    statistics moved by each forward; under the default conventions the batch-span multiplier
    and the cap after it are inside the graph (the batch size changes at step 3)."""
    torch.manual_seed(0)
    net = lenet_bn().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    plan = fxbackmatch.prepare(net, x[:2], compile=False, conventions=conventions)
    rt = plan._runtime
    assert (rt.multiplier is not None) == (conventions == "default")
    rt.graph_rescale = True
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(6):
        net.zero_grad(set_to_none=False)
        n = 16 if step < 3 else 4  # a smaller batch: another span multiplier, same graph
        F.cross_entropy(net(x[:n] * (1 + 0.1 * step)), y[:n]).backward()
        if step == 4:
            w = next(net.parameters())
            w.grad = w.grad.clone()
        saved = {n: p.grad.clone() for n, p in net.named_parameters()}
        s = plan.scales()
        got = plan.rescale_grads_()
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.grad, saved[n] * s[n], rtol=1e-6, atol=0, msg=f"step {step}, {n}")
        torch.testing.assert_close(plan.applied_scales(), s)
        opt.step()
    cache = rt._rescale_graphs
    assert (cache.captures, cache.hits, cache.enabled) == (2, 2, True)


@pytest.mark.cuda
@pytest.mark.parametrize("set_to_none", [False, True], ids=["zeroed", "freed"])
def test_graphed_rescale_trains_as_the_plain_rescale(set_to_none, monkeypatch):
    """Ten attached SGD steps with and without ``graph_rescale`` from the same weights, the
    gradients zeroed or freed between steps (freed: whether their addresses recur is the
    allocator's; either way the weights must agree)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    first = lenet_bn().cuda()
    nets = [first, lenet_bn().cuda()]
    nets[1].load_state_dict(first.state_dict())
    opts, plans = [], []
    for net, graphed in zip(nets, (False, True)):
        plan = fxbackmatch.prepare(net, x[:2], compile=False)  # no compile: device_run.sh gives all CUDA tests 120 s
        plan._runtime.graph_rescale = graphed
        plans.append(plan)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        plan.attach(opt, weight_decay=1e-4)
        opts.append(opt)
    for step in range(10):
        for net, opt in zip(nets, opts):
            opt.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    cache = plans[1]._runtime._rescale_graphs
    if not set_to_none:  # the same gradients every step: captured once, replayed from then on
        assert (cache.captures, cache.hits) == (1, 8)


@pytest.mark.cuda
def test_captures_survive_a_thread_pinning_host_memory():
    """A DataLoader's pin-memory thread allocates pinned host memory at any time; a capture in
    "global" mode would make that allocation fail (or be invalidated by it). Both captures — the scales' graph
    and the whole rescale's — happen while another thread pins fresh host memory in a loop:
    neither the thread nor the captures fail, and the rescale is the plain product."""
    import threading

    torch.manual_seed(0)
    net = lenet_bn().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    plan = fxbackmatch.prepare(net, x[:2], compile=False)  # no compile: device_run.sh gives all CUDA tests 120 s
    rt = plan._runtime
    stop, errors, kept = threading.Event(), [], []

    def pin() -> None:  # as a pin-memory thread does: new pinned blocks, none freed
        try:
            while not stop.is_set() and len(kept) < 4096:
                kept.append(torch.empty(1024 + len(kept)).pin_memory())
        except Exception as e:  # noqa: BLE001 — what the test is about
            errors.append(e)

    t = threading.Thread(target=pin, daemon=True)
    t.start()
    try:
        plan.scale_tensor()  # the scales' graph
        rt.graph_rescale = True
        for _ in range(3):  # seen, captured, replayed
            net.zero_grad(set_to_none=False)
            F.cross_entropy(net(x), torch.zeros(16, dtype=torch.long, device="cuda")).backward()
            saved = {n: p.grad.clone() for n, p in net.named_parameters()}
            s = plan.scales()
            plan.rescale_grads_()
            for n, p in net.named_parameters():
                torch.testing.assert_close(p.grad, saved[n] * s[n], rtol=1e-6, atol=0)
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors
    assert kept
    assert rt.cuda_graph and rt._graphed is not None
    assert rt._rescale_graphs.enabled and rt._rescale_graphs.captures == 1


def test_graphs_are_captured_only_on_the_current_cuda_device(monkeypatch):
    """Work on a CUDA device other than the current one is not on the capture stream (it would
    run once and the graph replay nothing): such a device, like the CPU, gets no graph."""
    from fxbackmatch.runtime.graphs import capturable

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert capturable(torch.device("cuda", 1)) and capturable(torch.device("cuda"))
    assert not capturable(torch.device("cuda", 0)) and not capturable(torch.device("cpu"))


@pytest.mark.cuda
def test_host_values_reach_the_device_without_a_sync():
    """Under ``set_sync_debug_mode("error")`` a plain host-to-device copy raises (the control:
    the mode sees it), while ``to_device`` / ``tensor_on`` copy the same values without one."""
    from fxbackmatch.runtime.transfer import tensor_on, to_device

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            torch.tensor([1.5, 2.5]).to("cuda")
        a = to_device(torch.tensor([1.5, 2.5], dtype=torch.float64), "cuda")
        b = tensor_on([3, 1, 2], torch.long, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert a.tolist() == [1.5, 2.5] and b.tolist() == [3, 1, 2] and b.dtype == torch.long


@pytest.mark.cuda
@pytest.mark.parametrize("how", ["attach", "two-optimizers", "length", "compile_step", "fused-adamw", "graph_rescale"])
def test_a_training_step_never_waits_for_the_device(how):
    """After three warm-up steps (compiles, captures, one-time copies), three more steps under
    ``torch.cuda.set_sync_debug_mode("error")``: nothing in a default plan's step (the batch-span
    multiplier, the graphed scales, applied_scales' merge for two optimizers, Adam's step-length
    mode, the fused SGD step, the fused AdamW update with a scheduled lr and CPU step counters,
    the one-graph rescale) makes the host wait for the device."""
    torch.manual_seed(0)
    net = lenet_bn().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    plan = fxbackmatch.prepare(net, x[:2], compile=False)  # default conventions: span="batch"
    assert plan._runtime.multiplier is not None
    params = list(net.parameters())
    if how == "two-optimizers":
        opts = [torch.optim.SGD(params[:4], lr=0.01, momentum=0.9), torch.optim.SGD(params[4:], lr=0.01, momentum=0.9)]
        for o in opts:
            plan.attach(o)
        steps = [o.step for o in opts]
    elif how == "length":
        opts = [torch.optim.AdamW(params, lr=1e-3)]
        plan.attach(opts[0], mode="length")
        steps = [opts[0].step]
    elif how == "compile_step":
        opts = [torch.optim.SGD(params, lr=0.01, momentum=0.9)]
        steps = [plan.compile_step(opts[0])]
    elif how == "fused-adamw":  # its update eager (no inductor compile in the device's test time)
        import warnings

        from fxbackmatch.apply.fused import FusedStep

        opts = [torch.optim.AdamW(params, lr=1e-3)]
        sched = torch.optim.lr_scheduler.StepLR(opts[0], 1, gamma=0.9)  # a new lr every step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Adam cancels a rescale: not what this test is about
            fused = FusedStep(plan, opts[0], compile=False)
        steps = [fused, sched.step]
    else:
        opts = [torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)]
        plan.attach(opts[0], weight_decay=1e-4)
        plan._runtime.graph_rescale = how == "graph_rescale"
        steps = [opts[0].step]

    def step() -> None:
        for o in opts:
            o.zero_grad(set_to_none=False)
        F.cross_entropy(net(x), y).backward()
        for s in steps:
            s()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(p).all() for p in params)
    if how == "graph_rescale":
        assert plan._runtime._rescale_graphs.hits >= 3


def test_kept_tables_make_each_entry_once_and_stay_bounded():
    """``kept`` calls ``make`` once per key (the second ask returns the same tensor) and holds
    at most ``KEPT_MAX`` entries: past that it starts again, and a dropped key is made anew."""
    from fxbackmatch.runtime.transfer import KEPT_MAX, kept

    made, table = [], {}

    def ask(k):
        return kept(table, k, lambda: made.append(k) or torch.tensor(float(k)))

    first = ask(1)
    assert ask(2).item() == 2.0 and ask(1) is first and made == [1, 2]
    for k in range(3, KEPT_MAX + 5):
        ask(k)
        assert len(table) <= KEPT_MAX
    assert ask(1).item() == 1.0 and made.count(1) == 2  # dropped when the table started again
