"""Every ```python block of README.md runs as it is (CPU, synthetic data), in order, in one
namespace — a later block may use the names an earlier one defined, as a reader would.

A block that cannot run here says so in the README, on the line right before it:
``<!-- skip-test: REASON -->`` (a GPU, the network, long training, or not code at all); the
test reports the reason. Each block is its own test; running one runs the blocks before it
first."""
from __future__ import annotations

import ast
import inspect
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*skip-test:\s*(.+?)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number of the opening fence, code, skip reason or None) per ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = SKIP.search(lines[k]) if k >= 0 else None
            blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_blocks_and_every_skip_names_a_reason():
    assert len(BLOCKS) >= 6
    assert all(reason is None or reason.strip() for _, _, reason in BLOCKS)
    # a stray marker (not right before a python block) would skip nothing: refuse it
    markers = len(SKIP.findall(README.read_text(encoding="utf-8")))
    assert markers == sum(reason is not None for _, _, reason in BLOCKS)


@pytest.fixture(scope="module")
def namespace():
    return {"ns": {"__name__": "readme"}, "ran": set()}


def _run(index: int, state) -> None:
    line, code, reason = BLOCKS[index]
    if reason is not None or index in state["ran"]:
        return
    state["ran"].add(index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the blocks' warnings (Lightning's, HF's) are not the test
        exec(compile(code, f"README.md:{line}", "exec"), state["ns"])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(index, namespace, tmp_path, monkeypatch):
    line, _, reason = BLOCKS[index]
    if reason is not None:
        pytest.skip(f"README.md:{line}: {reason}")
    monkeypatch.chdir(tmp_path)  # anything a block writes (Lightning, the HF Trainer) lands here
    for earlier in range(index + 1):
        _run(earlier, namespace)


def test_the_api_listing_matches_prepare():
    """The API block is a listing, not code (skipped above): its ``prepare`` signature must
    still be the real one — every parameter, each with its default."""
    import fxbackmatch

    listing = next(code for _, code, _ in BLOCKS if code.lstrip().startswith("plan = fxbackmatch.prepare("))
    call = listing[listing.index("prepare(") + len("prepare("):]
    call = call[:call.index(")\n")]
    real = inspect.signature(fxbackmatch.prepare).parameters
    listed = {}
    for p in (p.strip() for p in call.replace("\n", " ").split(",")):
        if p and p != "*":
            name, sep, default = p.lstrip("*").partition("=")  # ``**deprecated``: the name
            listed[name] = ast.literal_eval(default) if sep else inspect.Parameter.empty
    assert set(listed) == set(real), f"README lists {sorted(set(listed) - set(real))}, lacks {sorted(set(real) - set(listed))}"
    for name, default in listed.items():
        assert default == real[name].default, (name, default, real[name].default)


def test_the_quickstart_trains_as_a_hand_loop():
    """The quickstart block, run alone, leaves its net where a plain eager loop from the same
    init and batches does: a separately prepared plan's scales multiplied into each gradient,
    then the same SGD step. Its own checks are none, so this is where its numbers are checked."""
    import torch

    import fxbackmatch
    from fxbackmatch.models import lenet_bn

    line, code, _ = next(b for b in BLOCKS if "plan.attach(opt" in b[1] and "loader = [" in b[1])
    ns: dict = {"__name__": "readme"}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"README.md:{line}", "exec"), ns)
    torch.manual_seed(0)
    ref = lenet_bn()  # the block's net is the first thing it draws
    plan = fxbackmatch.prepare(ref, torch.zeros(2, 3, 32, 32), compile=False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.02, momentum=0.9)
    assert len(ns["loader"]) == 3
    for x, y in ns["loader"]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        scales = plan.scales()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.grad.mul_(scales[n])
        opt.step()
    for (n, p), q in zip(ns["net"].named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    torch.manual_seed(0)
    init = lenet_bn()
    moved = max(float((p - q).norm() / q.norm()) for p, q in zip(ref.parameters(), init.parameters()))
    assert moved > 1e-3  # the steps did move the weights: the comparison is not init = init
