"""The report, its dict/JSON form and the command line (issue 4)."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import fxbackmatch
from fxbackmatch.models import lenet_bn

import oracles
from oracles import lenet_closed_form, lenet_closed_form_m


@pytest.fixture(scope="module")
def lenet_plan():
    torch.manual_seed(0)
    net = lenet_bn()
    return net, fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False, conventions="paper")


def test_report_figures_of_paper_lenet(lenet_plan):
    net, plan = lenet_plan
    d = plan.to_dict()
    assert [r["s"] for r in d["layers"]] == [196, 25, 1, 1, 1]
    assert d["layers"][1]["c"] == pytest.approx(7.84)
    want, want_m = lenet_closed_form(net), lenet_closed_form_m(net)
    for row in d["layers"]:  # the scale and m columns, each against the paper's own steps
        assert row["scale"] == pytest.approx(want[f"{row['name']}.weight"], rel=1e-9)
        assert row["m"] == pytest.approx(want_m[row["name"]], rel=1e-9)
    assert d["scaled"] == d["trainable"] == 5 and d["uncovered"] == {}
    json.loads(json.dumps(d))  # serializable


def test_plain_text_fits_100_columns_and_shows_figures(lenet_plan):
    _, plan = lenet_plan
    text = str(plan)
    lines = text.splitlines()
    assert max(len(l) for l in lines) <= 100
    assert "rule=backmatch" in lines[0] and "input 2×3×32×32" in lines[0] and "5/5" in lines[0]
    assert "196" in text and "7.84" in text and "\x1b[" not in text
    rows = [l for l in lines if l.startswith("|") and ("Conv2d" in l or "Linear" in l)]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "4", "9", "12", "15"]


def test_rich_terminal_rendering(lenet_plan):
    _, plan = lenet_plan
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140, color_system="truecolor")
    plan.report(console=console)
    out = buf.getvalue()
    assert "\x1b[" in out and "Conv2d" in out and "7.84" in out


def test_compare_with_lars_and_lsalr_and_effective_lr():
    torch.manual_seed(1)
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    plan.attach(opt)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(net(x), y).backward()
    d = plan.to_dict(compare=("lars", "lsalr"))
    for row in d["layers"]:
        p = net.get_parameter(f"{row['name']}.weight")
        w, g = float(p.detach().double().norm()), float(p.grad.double().norm())
        assert row["compare"]["lars"] == pytest.approx(1e-3 * w / g, rel=1e-9)
        assert row["compare"]["lsalr"] == pytest.approx(1 + math.log(1 + 1 / g), rel=1e-9)
        assert row["effective_lr"] == [pytest.approx(0.02 * row["scale"], rel=1e-12)]
    text = plan.report.__self__.__str__()
    assert "lr·scale" in text
    buf = io.StringIO()
    plan.report(compare=("lars", "lsalr"), console=Console(file=buf, width=160))
    assert "lars rate" in buf.getvalue() and "lsalr rate" in buf.getvalue()


def test_uncovered_listed_below_table():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    net.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    plan = fxbackmatch.prepare(net, torch.randn(2, 4), compile=False)
    text = str(plan)
    assert "Not covered (scale 1): 1 parameter(s)" in text and "unused" in text


def _cli(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """``python -m fxbackmatch ARGS`` for each of ``calls``, all started at once (each spends
    seconds importing torch; they overlap on two cores)."""
    procs = [(args, subprocess.Popen([sys.executable, "-m", "fxbackmatch", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for args in calls]
    done = []
    for args, p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return done


def test_cli_subprocess_report_and_error():
    r, bad = _cli(("report",), ("report", "lenet-bn", "--input-shape", "2,3,28,28"))
    assert r.returncode == 0, r.stderr
    assert "Conv2d" in r.stdout and "196" in r.stdout
    assert max(len(l) for l in r.stdout.splitlines()) <= 100
    assert bad.returncode == 2 and "shape propagation failed" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_in_process_json_errors_and_help(capsys):
    from fxbackmatch.cli import main

    torch.manual_seed(0)  # the CLI builds LeNet-BN as its first draw, then a batch of 2
    assert main(["report", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [row["s"] for row in d["layers"]] == [196, 25, 1, 1, 1]
    assert d["layers"][1]["c"] == pytest.approx(7.84)
    # the default conventions' numbers by hand for the linear layers: the floored norms
    # rown = max(ΣW², out/3)/out and coln = max(ΣW², out/3)/in, ReLU's ½ slope and its output
    # variance ½ − 1/2π after each BN, and the span divisors n/B (B = 2) of 200, 60 and 42
    torch.manual_seed(0)
    net = lenet_bn()
    rown = {i: oracles.rown(net[i].weight, floor=True) for i in (9, 12, 15)}
    coln = {i: oracles.coln(net[i].weight, floor=True) for i in (9, 12, 15)}
    relu_var = 0.5 - 1 / (2 * math.pi)
    rows = {row["name"]: row for row in d["layers"]}
    assert rows["15"]["scale"] == pytest.approx(1 / (relu_var * 42), rel=1e-9) and rows["15"]["m"] == 1.0
    assert rows["12"]["scale"] == pytest.approx(2 * rown[12] / coln[15] / 60, rel=1e-9)
    assert rows["12"]["m"] == pytest.approx(coln[15] / (2 * rown[12] * relu_var), rel=1e-9)
    assert rows["9"]["scale"] == pytest.approx(4 * relu_var * rown[9] * rown[12] / (coln[12] * coln[15]) / 200,
                                               rel=1e-9)
    assert main([]) == 0 and "Conv2d" in capsys.readouterr().out
    for bad, msg in [
        (["report", "nosuch"], "unknown model"),
        (["report", "nosuchpkg.mod:fn"], "cannot import"),
        (["report", "torch.nn:NoSuch"], "no callable"),
        (["report", "lenet-bn", "--input-shape", "2,3,28,28"], "shape propagation failed"),
        (["report", "--rule", "adamw"], "unknown rule"),
    ]:
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "torchvision.models:resnet18" in out


def test_resnet_report_keeps_one_line_per_layer_with_a_legend():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False, outputs=0, conventions=fxbackmatch.Conventions(gamma="exact"))
    lines = str(plan).splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = [line for line in lines if line.startswith("|") and not line.startswith("|-") and line.split("|")[1].strip() != "layer"]
    assert len(rows) == len(plan.layers)
    assert any(line.startswith("  [1] ") for line in lines)  # the notes' legend under the table
    assert "loss outputs: 0" in lines


def test_tracked_relative_updates_against_a_hand_step():
    """``plan.track_updates(opt)``: after one plain SGD step (no momentum) on the attached
    plan, each weight moved by ``lr·scale·‖g‖`` (the gradient before the rescale), so its
    relative update is ``lr·scale·‖g‖/‖W‖``; the report shows the column; ``remove()``
    stops the recording. An untracked plain optimizer is tracked the same way (scale 1)."""
    torch.manual_seed(0)
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    lr = 0.05
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    plan.attach(opt)
    tracker = plan.track_updates(opt)
    assert plan.last_updates() == {}
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    scales = plan.scales()
    want = {n: lr * scales[n] * float(p.grad.double().norm()) / float(p.detach().double().norm())
            for n, p in net.named_parameters()}
    opt.step()
    got = plan.last_updates()
    assert set(got) == set(want)
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=1e-5), n
    from fxbackmatch.report.render import render_text

    text = render_text(plan, width=140)
    assert "‖ΔW‖/‖W‖" in text and f"{got['0.weight']:.4g}" in text
    tracker.remove()
    opt.zero_grad()
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    opt.step()
    assert plan.last_updates() == got
    # a plain optimizer without attach: the relative update is lr·‖g‖/‖W‖
    plain = torch.optim.SGD(net.parameters(), lr=lr)
    plan.track_updates(plain)
    plain.zero_grad()
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    w = net[9].weight
    expect = lr * float(w.grad.double().norm()) / float(w.detach().double().norm())
    plain.step()
    assert plan.last_updates()["9.weight"] == pytest.approx(expect, rel=1e-5)


def test_applied_scales_are_those_of_the_last_rescale_for_gradient_rules():
    """LARS reads the gradient: recomputed after ``rescale_grads_`` it would see the rescaled
    gradient (τ‖W‖/‖s·g‖ = 1). ``applied_scales`` keeps what was multiplied, checked against the
    ratio of the gradients before and after; ``scales()``, the report and ``effective_lrs`` give
    the same while the gradients are the rescaled ones (they showed 1.0), and read the
    gradients again once a new backward replaced them (the LARS formula by hand)."""
    torch.manual_seed(0)
    net = lenet_bn()
    tau = 1e-3
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), rule="lars", compile=False, trust_coefficient=tau,
                               conventions="paper")  # the plain formula: no batch multiplier
    assert plan.applied_scales() == {}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = plan.attach(opt)
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    applied = plan.applied_scales()
    for n, p in net.named_parameters():
        ratio = float(p.grad.double().norm() / before[n].double().norm())
        assert applied[n] == pytest.approx(ratio, rel=1e-5), n
    assert applied["9.weight"] != pytest.approx(1.0, rel=1e-2)
    assert plan.scales() == pytest.approx(applied, rel=1e-12)
    lrs = handle.effective_lrs()[0]
    rows = {r["name"]: r for r in plan.to_dict()["layers"]}
    assert lrs["9.weight"] == pytest.approx(0.1 * applied["9.weight"], rel=1e-12)
    assert rows["9"]["scale"] == pytest.approx(applied["9.weight"], rel=1e-12)
    opt.zero_grad()
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    w, g = net[9].weight.detach().double(), net[9].weight.grad.double()
    assert plan.scales()["9.weight"] == pytest.approx(tau * float(w.norm()) / float(g.norm()), rel=1e-9)


def test_the_length_mode_column_is_labelled_as_the_ratio_it_holds():
    """``attach(mode="length")``'s ``effective_lrs`` are the last step's length ratios
    ``T/‖u‖`` (not ``lr·scale``): the report's column says so, beside an SGD handle's
    ``lr·scale`` column, and holds the ratio the handle reports."""
    torch.manual_seed(0)
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    adam = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    length = plan.attach(adam, mode="length")
    plan.attach(sgd)
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    scales = plan.scales()
    before = {n: (p.detach().double().clone(), p.grad.double().clone()) for n, p in net.named_parameters()}
    adam.step()
    # oracle, AdamW's first step by hand: u = −lr·(wd·W + g/(|g|+eps)) and the target
    # T = lr·scale·‖g‖ (the first moment over 1 − β₁ is g), so T/‖u‖ = scale·‖g‖/‖wd·W + g/(|g|+eps)‖
    # and the weight moves by T
    group = adam.param_groups[0]
    for n, p in net.named_parameters():
        w, g = before[n]
        u = group["weight_decay"] * w + g / (g.abs() + group["eps"])
        assert length.last_ratios[n] == pytest.approx(scales[n] * float(g.norm()) / float(u.norm()), rel=1e-5), n
        moved = float((p.detach().double() - w).norm())
        assert moved == pytest.approx(group["lr"] * scales[n] * float(g.norm()), rel=1e-4), n
    text = str(plan)  # the plain-text report
    assert "T/‖u‖ #0" in text and text.count("lr·sca") == 1  # the SGD handle's (cut to fit 100 columns)
    d = plan.to_dict()
    assert d["effective_lr_kinds"] == ["length", "grad"]
    row = next(r for r in d["layers"] if r["name"] == "9")
    assert row["effective_lr"][0] == pytest.approx(length.last_ratios["9.weight"], rel=1e-12)


def test_gradient_rule_scales_with_an_optimizer_per_part():
    """Two optimizers over two halves of LeNet, both attached, LARS: each rescales its own
    part, so after both steps every parameter's ``applied_scales()`` and ``scales()`` are the
    LARS rate of its raw gradient (computed by hand before the steps). The second optimizer's
    call used to replace every entry, the first part's with rates of its rescaled gradients (1.0)."""
    torch.manual_seed(0)
    net = lenet_bn()
    tau = 1e-3
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), rule="lars", compile=False, trust_coefficient=tau,
                               conventions="paper")
    params = list(net.named_parameters())
    opts = [torch.optim.SGD([p for _, p in params[:4]], lr=0.1), torch.optim.SGD([p for _, p in params[4:]], lr=0.1)]
    for o in opts:
        plan.attach(o)
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    want = {n: tau * float(p.detach().double().norm()) / float(p.grad.double().norm()) for n, p in params}
    for o in opts:
        o.step()
    applied, shown = plan.applied_scales(), plan.scales()
    for n, _ in params:
        assert applied[n] == pytest.approx(want[n], rel=1e-9), n
        assert shown[n] == pytest.approx(want[n], rel=1e-9), n
