"""``benchmarks/table2.py``'s budget: the probe's arithmetic against a hand count, and the
``--compile auto`` choice on a simulated clock (a fake ``train`` that advances it by the
costs a real run pays), so the script is checked to end before its deadline."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import table2  # noqa: E402


def test_epochs_that_fit_is_the_hand_count():
    probes = {"sgd": {"epoch": 3.0, "first_extra": 10.0, "fixed": 2.0},
              "backmatch": {"epoch": 2.5, "first_extra": 1.0, "fixed": 2.5}}
    # 0.95·300 = 285; once: 2 + 2.5 + 2·min(10, 1) = 6.5; (285 − 6.5) / 5.5 = 50.6
    assert table2.epochs_that_fit(probes, 300.0, 60) == 50
    assert table2.epochs_that_fit(probes, 300.0, 40) == 40
    assert table2.epochs_that_fit(probes, 5.0, 60) == 0  # not even the fixed costs fit
    # the first probe paid the process's compile: its run counts the others' largest excess
    probes["lars"] = {"epoch": 4.5, "first_extra": 3.0, "fixed": 0.5}
    # once: 2 + 2.5 + 0.5 + (1 + 3) + max(1, 3) = 12; (0.95·296 − 12) / 10 = 26.9
    assert table2.epochs_that_fit(probes, 296.0, 60) == 26
    assert table2.epochs_that_fit({"sgd": probes["sgd"]}, 300.0, 90) == 90  # alone: its own excess
    assert table2.epochs_that_fit({"sgd": probes["sgd"]}, 100.0, 90) == 27  # (95 − 2 − 10) / 3 = 27.7


class FakeWorld:
    """A simulated clock and a ``train`` that advances it: per call ``fixed`` seconds, then
    per epoch ``epoch[compile]`` seconds, the first epoch of a process for a model and mode
    also ``once[compile]`` (compile, autotuning), the first epoch of every run ``extra``."""

    def __init__(self, epoch, once, fixed=1.5, extra=0.5, fail_compile=False, hang_compile=False, fail_if=None):
        self.t, self.epoch, self.once, self.fixed, self.extra = 0.0, epoch, once, fixed, extra
        self.fail_compile, self.hang_compile, self.paid, self.calls = fail_compile, hang_compile, set(), []
        self.fail_if = fail_if or (lambda model, method, epochs, compile: False)

    def now(self) -> float:
        return self.t

    def train(self, cfg, console=None, data=None):
        m, seed, c = cfg.methods[0], cfg.seeds[0], bool(cfg.compile)
        self.calls.append((cfg.model, m, cfg.epochs, c))
        if (c and self.fail_compile) or self.fail_if(*self.calls[-1]):
            self.t += 7.0
            raise RuntimeError("inductor: a simulated lowering failure")
        if c and self.hang_compile:
            time.sleep(30)  # a compile that does not end (in real time: the limit is a real alarm)
        self.t += self.fixed
        walls = []
        for e in range(cfg.epochs):
            w = self.epoch[c] + (self.extra if e == 0 else 0.0)
            if e == 0 and (cfg.model, c) not in self.paid:
                w += self.once[c]
                self.paid.add((cfg.model, c))
            walls.append(w)
            self.t += w
        rows = [{"epoch": e + 1, "lr": 0.1, "train_loss": 1.0 / (e + 1), "train_acc": 0.5, "test_acc": 0.5,
                 "epoch_seconds": 0.8 * w} for e, w in enumerate(walls)]
        acc = {"mean": rows[-1]["test_acc"]}
        summary = {"methods": {m: {"best_test_acc": acc, "final_test_acc": acc, "mean_images_per_s": 1.0}}}
        return SimpleNamespace(rows=rows, summary=summary, runs={f"{m}/{seed}": {"epoch_wall_seconds": walls}})


class FakeData:
    def to(self, device):
        return self

    def describe(self):
        return "fake data"


@pytest.fixture
def world(monkeypatch):
    def make(**kw):
        w = FakeWorld(**kw)
        monkeypatch.setattr(table2, "now", w.now)
        monkeypatch.setattr(table2, "train", w.train)
        monkeypatch.setattr(table2, "load_cached", lambda *a, **k: FakeData())
        return w
    return make


def run_main(tmp_path, *extra):
    rc = table2.main(["--device", "cpu", "--budget-s", "600", "--jobs", "vgg16:0,vgg11:1", "--max-epochs", "500",
                      "--out", str(tmp_path), *extra])
    return rc, json.loads((tmp_path / "table2.json").read_text())


def test_auto_compiles_where_faster_and_the_table_ends_before_its_deadline(world, tmp_path):
    w = world(epoch={False: 3.0, True: 1.2}, once={False: 4.0, True: 60.0})
    rc, out = run_main(tmp_path, "--compile", "auto")
    assert rc == 0 and w.t <= 600.0
    vgg16 = out["results"][0]
    assert vgg16["compile"] is True
    # probe (s): sgd eager 1.5+2·3+0.5+4 = 12, sgd compiled 1.5+2·1.2+0.5+60 = 64.4,
    # backmatch compiled 1.5+2·1.2+0.5 = 4.4, so 80.8 s in; the estimate's per-epoch cost is
    # 2.4, its once-per-run cost 2·1.5 + 2·0.5 = 4: ⌊(0.95·(600 − 80.8) − 4) / 2.4⌋ = 203
    assert vgg16["epochs"] == 203
    assert [c for c in w.calls if c[2] == 203] == [("vgg16", "sgd", 203, True), ("vgg16", "backmatch", 203, True)]
    assert len(out["results"]) == 1 and 600.0 - w.t < 30  # too little left for the second job


def test_a_second_model_pays_its_own_probe_in_what_is_left(world, tmp_path):
    w = world(epoch={False: 3.0, True: 1.2}, once={False: 4.0, True: 60.0})
    rc, out = run_main(tmp_path, "--compile", "auto", "--max-epochs", "100")
    # vgg16: the same 80.8 s probe, then 100 epochs: 80.8 + 2·(1.5 + 0.5 + 100·1.2) = 324.8 s;
    # vgg11's probe (its own compile) ends at 405.6 s: ⌊(0.95·194.4 − 4) / 2.4⌋ = 75
    assert rc == 0 and [(r["model"], r["epochs"], r["compile"]) for r in out["results"]] == [
        ("vgg16", 100, True), ("vgg11", 75, True)]
    assert w.calls[5:8] == [("vgg11", "sgd", 2, False), ("vgg11", "sgd", 2, True), ("vgg11", "backmatch", 2, True)]
    assert w.t == pytest.approx(589.6) and "torch.compile: vgg11, vgg16" in (tmp_path / "table2.md").read_text()


def test_auto_keeps_eager_where_compiled_is_not_faster_or_fails(world, tmp_path):
    w = world(epoch={False: 3.0, True: 2.9}, once={False: 4.0, True: 30.0})
    rc, out = run_main(tmp_path / "slow", "--compile", "auto", "--jobs", "vgg16:0")
    assert rc == 0 and out["results"][0]["compile"] is False  # 2.9 s is not 5 % under 3.0 s
    assert all(not c[3] for c in w.calls[2:])
    w = world(epoch={False: 3.0, True: 1.0}, once={False: 4.0, True: 30.0}, fail_compile=True)
    rc, out = run_main(tmp_path / "fail", "--compile", "auto", "--jobs", "vgg16:0")
    assert rc == 0 and out["results"][0]["compile"] is False and all(not c[3] for c in w.calls[2:])


def test_a_later_job_of_the_same_model_reuses_its_probe(world, tmp_path):
    w = world(epoch={False: 2.0, True: 2.0}, once={False: 5.0, True: 5.0})
    rc, out = run_main(tmp_path, "--jobs", "vgg11:0,vgg11:1", "--max-epochs", "20")
    assert rc == 0 and [r["epochs"] for r in out["results"]] == [20, 20]
    assert [c[2] for c in w.calls] == [2, 2, 20, 20, 20, 20]  # one probe for both seeds
    assert w.t <= 600.0


def test_a_compile_past_its_time_limit_falls_back_to_eager(world, tmp_path):
    from argparse import Namespace

    w = world(epoch={False: 3.0, True: 1.0}, once={False: 4.0, True: 30.0}, hang_compile=True)
    args = Namespace(methods="sgd,backmatch", compile="auto", data=None, width=1.0, batch_size=128,
                     weight_decay=1e-4, augment="crop", device="cpu")
    t = time.monotonic()
    probes = table2.probe_job(args, None, "vgg16", 0, tmp_path, table2.Console(quiet=True), compile_limit=0.3)
    assert time.monotonic() - t < 10
    assert [p["compile"] for p in probes.values()] == [False, False]
    assert [c[3] for c in w.calls] == [False, True, False]


def test_a_failing_compiled_probe_of_a_later_method_probes_every_method_eagerly(world, tmp_path):
    w = world(epoch={False: 3.0, True: 1.0}, once={False: 4.0, True: 30.0},
              fail_if=lambda model, method, epochs, compile: compile and method == "backmatch")
    rc, out = run_main(tmp_path, "--compile", "auto", "--jobs", "vgg16:0", "--max-epochs", "20")
    assert rc == 0 and out["results"][0]["compile"] is False
    assert [(c[1], c[3]) for c in w.calls[:4]] == [("sgd", False), ("sgd", True), ("backmatch", True),
                                                   ("backmatch", False)]
    assert all(not c[3] for c in w.calls[4:])


def test_a_failing_job_keeps_the_others(world, tmp_path):
    w = world(epoch={False: 2.0, True: 2.0}, once={False: 5.0, True: 5.0},
              fail_if=lambda model, method, epochs, compile: model == "vgg16" and epochs > 2)
    rc, out = run_main(tmp_path, "--max-epochs", "20")
    assert rc == 0 and [(r["model"], r["epochs"]) for r in out["results"]] == [("vgg11", 20)]
    assert w.t <= 600.0


def test_time_limit_leaves_no_alarm_behind(monkeypatch):
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(a))  # a stray alarm lands here
    try:
        with table2.time_limit(0.2):
            pass
        with table2.time_limit(float("inf")):  # no limit: no timer (setitimer refuses inf)
            time.sleep(0.05)
        time.sleep(0.4)
        assert fired == [] and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        with pytest.raises(table2.ProbeTimeout, match="still running after"):
            with table2.time_limit(0.1):
                try:
                    time.sleep(5)
                except Exception:  # what library code may do: it must not swallow the limit
                    pass
        # a timer armed outside survives an inner limit
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with table2.time_limit(0.2):
            pass
        assert 25.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []
