"""The authors' networks load their state dicts strictly (METHOD.md §9a.1), and the CIFAR path a
user runs to reproduce the paper's CIFAR-10 row works end to end (issue 23, Deliver 1 and 5).

The layouts are written here a second time, independently of ``stakes.authors``: the keys and
shapes of a state dict saved from the authors' modules, as §9a describes them, and a functional
eval-mode forward over such a state dict. A random state dict of that layout must load with
``strict=True`` through the command line's loader and the Python API, and the loaded model must
compute what the functional forward computes on normalised inputs.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stakes
from stakes import authors
from stakes.data import ImageData
from stakes.jobs import ModelSpec, load_model

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


# ----------------------------------------------------------------------------- the layouts, written again

def _bn(state, name, c, g):
    state[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
    state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    state[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
    state[f"{name}.num_batches_tracked"] = torch.tensor(7)


def _conv(state, name, c_out, c_in, k, g):
    state[name] = torch.randn(c_out, c_in, k, k, generator=g) * (2.0 / (c_in * k * k)) ** 0.5


def their_cifar10_state(blocks, bottleneck: bool, classes: int, seed: int = 0) -> dict:
    """conv1 (3×3), bn1, layer1-4 of torchvision-named blocks (conv1/bn1/conv2/bn2[/conv3/bn3],
    downsample.0/1), fc."""
    g = torch.Generator().manual_seed(seed)
    s, expansion = {}, 4 if bottleneck else 1
    _conv(s, "conv1.weight", 64, 3, 3, g)
    _bn(s, "bn1", 64, g)
    c = 64
    for li, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            st = stride if b == 0 else 1
            if bottleneck:
                _conv(s, f"{p}.conv1.weight", planes, c, 1, g), _bn(s, f"{p}.bn1", planes, g)
                _conv(s, f"{p}.conv2.weight", planes, planes, 3, g), _bn(s, f"{p}.bn2", planes, g)
                _conv(s, f"{p}.conv3.weight", planes * 4, planes, 1, g), _bn(s, f"{p}.bn3", planes * 4, g)
            else:
                _conv(s, f"{p}.conv1.weight", planes, c, 3, g), _bn(s, f"{p}.bn1", planes, g)
                _conv(s, f"{p}.conv2.weight", planes, planes, 3, g), _bn(s, f"{p}.bn2", planes, g)
            if b == 0 and (st != 1 or c != planes * expansion):
                _conv(s, f"{p}.downsample.0.weight", planes * expansion, c, 1, g)
                _bn(s, f"{p}.downsample.1", planes * expansion, g)
            c = planes * expansion
    s["fc.weight"] = torch.randn(classes, c, generator=g) * 0.05
    s["fc.bias"] = torch.randn(classes, generator=g) * 0.05
    return s


def _bn_eval(x, s, name):
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], training=False, eps=1e-5)


def their_cifar10_forward(s, x, blocks, bottleneck: bool):
    x = F.relu(_bn_eval(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)   # the max-pool after the 3×3 stride-1 stem (§9a.1)
    for li, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2)), start=1):
        for b in range(n):
            p, st = f"layer{li}.{b}", stride if b == 0 else 1
            idn = x
            if f"{p}.downsample.0.weight" in s:
                idn = _bn_eval(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=st), s, f"{p}.downsample.1")
            if bottleneck:
                y = F.relu(_bn_eval(F.conv2d(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1"))
                y = F.relu(_bn_eval(F.conv2d(y, s[f"{p}.conv2.weight"], stride=st, padding=1), s, f"{p}.bn2"))
                y = _bn_eval(F.conv2d(y, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
            else:
                y = F.relu(_bn_eval(F.conv2d(x, s[f"{p}.conv1.weight"], stride=st, padding=1), s, f"{p}.bn1"))
                y = _bn_eval(F.conv2d(y, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
            x = F.relu(y + idn)
    return F.linear(x.mean((2, 3)), s["fc.weight"], s["fc.bias"])


def their_cifar100_state(blocks, bottleneck: bool, classes: int, seed: int = 0) -> dict:
    """conv1 = Sequential(conv, BN, ReLU), conv2_x..conv5_x of blocks with residual_function
    (conv, BN, ReLU, conv, BN[, ReLU, conv, BN]) and shortcut (empty, or conv 1×1, BN), fc."""
    g = torch.Generator().manual_seed(seed)
    s, expansion = {}, 4 if bottleneck else 1
    _conv(s, "conv1.0.weight", 64, 3, 3, g)
    _bn(s, "conv1.1", 64, g)
    c = 64
    for si, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=2):
        for b in range(n):
            p, st = f"conv{si}_x.{b}", stride if b == 0 else 1
            r = f"{p}.residual_function"
            if bottleneck:
                _conv(s, f"{r}.0.weight", planes, c, 1, g), _bn(s, f"{r}.1", planes, g)
                _conv(s, f"{r}.3.weight", planes, planes, 3, g), _bn(s, f"{r}.4", planes, g)
                _conv(s, f"{r}.6.weight", planes * 4, planes, 1, g), _bn(s, f"{r}.7", planes * 4, g)
            else:
                _conv(s, f"{r}.0.weight", planes, c, 3, g), _bn(s, f"{r}.1", planes, g)
                _conv(s, f"{r}.3.weight", planes, planes, 3, g), _bn(s, f"{r}.4", planes, g)
            if st != 1 or c != planes * expansion:
                _conv(s, f"{p}.shortcut.0.weight", planes * expansion, c, 1, g)
                _bn(s, f"{p}.shortcut.1", planes * expansion, g)
            c = planes * expansion
    s["fc.weight"] = torch.randn(classes, c, generator=g) * 0.05
    s["fc.bias"] = torch.randn(classes, generator=g) * 0.05
    return s


def their_cifar100_forward(s, x, blocks, bottleneck: bool):
    x = F.relu(_bn_eval(F.conv2d(x, s["conv1.0.weight"], padding=1), s, "conv1.1"))   # no max-pool
    for si, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2)), start=2):
        for b in range(n):
            p, st = f"conv{si}_x.{b}", stride if b == 0 else 1
            r = f"{p}.residual_function"
            idn = x
            if f"{p}.shortcut.0.weight" in s:
                idn = _bn_eval(F.conv2d(x, s[f"{p}.shortcut.0.weight"], stride=st), s, f"{p}.shortcut.1")
            if bottleneck:
                y = F.relu(_bn_eval(F.conv2d(x, s[f"{r}.0.weight"]), s, f"{r}.1"))
                y = F.relu(_bn_eval(F.conv2d(y, s[f"{r}.3.weight"], stride=st, padding=1), s, f"{r}.4"))
                y = _bn_eval(F.conv2d(y, s[f"{r}.6.weight"]), s, f"{r}.7")
            else:
                y = F.relu(_bn_eval(F.conv2d(x, s[f"{r}.0.weight"], stride=st, padding=1), s, f"{r}.1"))
                y = _bn_eval(F.conv2d(y, s[f"{r}.3.weight"], padding=1), s, f"{r}.4")
            x = F.relu(y + idn)
    return F.linear(x.mean((2, 3)), s["fc.weight"], s["fc.bias"])


def _normalised(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _rgb_data(classes: int) -> ImageData:
    g = torch.Generator().manual_seed(1)
    return ImageData(name="cifar10" if classes == 10 else "cifar100", class_names=[f"c{i}" for i in range(classes)],
                     train_x=torch.rand(6, 3, 32, 32, generator=g), train_y=torch.arange(6) % classes,
                     test_x=torch.rand(4, 3, 32, 32, generator=g), test_y=torch.arange(4) % classes)


CASES = [  # (name, family, blocks, bottleneck, classes)
    ("cifar10_resnet18", "cifar10", (2, 2, 2, 2), False, 10),
    ("cifar10_resnet50", "cifar10", (3, 4, 6, 3), True, 10),
    ("cifar100_resnet18", "cifar100", (2, 2, 2, 2), False, 100),
    ("cifar100_resnet50", "cifar100", (3, 4, 6, 3), True, 100),
]


@pytest.mark.parametrize("name,family,blocks,bottleneck,classes", CASES, ids=[c[0] for c in CASES])
def test_a_state_dict_of_the_authors_layout_loads_strictly_and_computes_their_forward(
        name, family, blocks, bottleneck, classes, tmp_path):
    make_state, forward, mean, std = ((their_cifar10_state, their_cifar10_forward, CIFAR10_MEAN, CIFAR10_STD)
                                      if family == "cifar10" else
                                      (their_cifar100_state, their_cifar100_forward, CIFAR100_MEAN, CIFAR100_STD))
    state = make_state(blocks, bottleneck, classes)
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    data = _rgb_data(classes)
    # the command line's loader (--model FILE --arch authors:NAME): strict, then split with their normalisation
    clf, meta = load_model(ModelSpec(path=str(path), arch=f"authors:{name}"), data)
    x = data.test_x
    want = forward(state, _normalised(x, mean, std), blocks, bottleneck)
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(x), want, rtol=1e-4, atol=1e-4)
    assert clf.normalization["mean"] == pytest.approx(list(mean)) and "authors'" in clf.normalization["source"]
    # the Python API: the network, strict load, stakes.unlearn adapts it
    net = authors.build(name, classes)
    net.load_state_dict(state, strict=True)
    assert sorted(net.state_dict()) == sorted(state)
    with torch.no_grad():
        torch.testing.assert_close(stakes.as_classifier(net).eval()(x), want, rtol=1e-4, atol=1e-4)


def test_the_authors_wrappers_keys_load_too(tmp_path):
    """Their Sequential(normalize, net) (keys 1.…) and ModelWrapper(normalize, net) (keys model.… and the
    wrapper's fc.…) state dicts map onto the network's own keys."""
    state = their_cifar10_state((2, 2, 2, 2), False, 10)
    data = _rgb_data(10)
    x = _normalised(data.test_x, CIFAR10_MEAN, CIFAR10_STD)
    want = their_cifar10_forward(state, x, (2, 2, 2, 2), False)
    wrapped = {"sequential": {f"1.{k}": v for k, v in state.items()},
               "model_wrapper": {**{f"model.{k}": v for k, v in state.items()},
                                 "fc.weight": state["fc.weight"], "fc.bias": state["fc.bias"]}}
    for form, sd in wrapped.items():
        path = tmp_path / f"{form}.pt"
        torch.save(sd, path)
        clf, _ = load_model(ModelSpec(path=str(path), arch="authors:cifar10_resnet18"), data)
        with torch.no_grad():
            torch.testing.assert_close(clf.eval()(data.test_x), want, rtol=1e-4, atol=1e-4, msg=form)


def test_a_file_that_does_not_fit_names_the_first_missing_and_unexpected_key(tmp_path):
    from stakes.cli import main

    state = their_cifar10_state((2, 2, 2, 2), False, 10)
    state.pop("layer1.0.bn1.running_var")
    state["maxpool.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(100, 512)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_model(ModelSpec(path=str(path), arch="authors:cifar10_resnet18"), _rgb_data(10))
    msg = str(err.value)
    assert "missing key 'layer1.0.bn1.running_var'" in msg and "unexpected key 'maxpool.weight'" in msg
    assert "shape of 'fc.weight': file [100, 512], model [10, 512]" in msg
    with pytest.raises(ValueError, match=r"authors:cifar10_resnet18 takes 3-channel|3-channel"):
        authors.build("cifar10_resnet18", 10, in_channels=1)
    # through the command line: one line, exit 2
    bad = main(["unlearn", "--dataset", "digits", "--model", str(path), "--arch", "authors:cifar10_resnet99",
                "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert bad == 2


def test_unlearn_gives_back_the_authors_class_in_their_layout(tmp_path):
    """A fixed (warm-started) projector deploys h∘g: the unlearned model is the authors' class, its
    state dict in their layout, loadable into their module again."""
    state = their_cifar10_state((2, 2, 2, 2), False, 10)
    net = authors.build("cifar10_resnet18", 10)
    net.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    forget = (torch.rand(2, 3, 16, 16, generator=g), torch.tensor([1, 2]))   # 16×16: the layout, at a quarter of the work
    cfg = stakes.preset("stable", method="adv", repetitions=1, pgd_steps=1, eps=1.0, max_steps=1, progress=False,
                        backend="reference")   # (the Triton interpreter would take a minute on 11M parameters)
    res = stakes.unlearn(net, forget, method="adv", config=cfg)
    assert type(res.model) is authors.Cifar10ResNet and sorted(res.model.state_dict()) == sorted(state)
    assert res.model_info["normalization"]["mean"] == pytest.approx(list(CIFAR10_MEAN))


# ----------------------------------------------------------------------------- the CIFAR path end to end

def _write_cifar10(folder, n_train=24, n_test=10):
    """A tiny CIFAR-10 in the real on-disk format: python pickles of uint8 rows (3072 = 3·32·32) and
    labels, five training batches, a test batch and batches.meta with the label names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(1, 6):
        n = n_train // 5 + (1 if i <= n_train % 5 else 0)
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": (np.arange(n) % 10).tolist()}
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     b"labels": (np.arange(n_test) % 10).tolist()}, fh)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in names]}, fh)
    return names


@pytest.mark.slow
def test_the_documented_cifar10_reproduction_command_runs(tmp_path):
    """README's command for the paper's CIFAR-10 row (``--model FILE --arch authors:cifar10_resnet18
    --preset authors``) on a tiny CIFAR-10 folder in the python-pickle format, with a descriptions
    file in the form of the authors' CIFAR10_Description.json (class → attributes; our own text) and
    MiniLM anchors, as CLIP weights are absent (the output says so). Small budgets, the preset's
    every switch recorded."""
    from stakes.cli import main

    names = _write_cifar10(tmp_path / "cifar-10-batches-py")
    descriptions = {n: [f"a {n} shape", f"the colours of a {n}", f"a {n} seen from the side"] for n in names}
    (tmp_path / "desc.json").write_text(json.dumps(descriptions))
    torch.save(their_cifar10_state((2, 2, 2, 2), False, 10), tmp_path / "resnet18.pt")
    out = tmp_path / "result.json"
    argv = ["unlearn", "--dataset", "cifar10", "--root", str(tmp_path), "--model", str(tmp_path / "resnet18.pt"),
            "--arch", "authors:cifar10_resnet18", "--preset", "authors", "--descriptions", str(tmp_path / "desc.json"),
            "--k", "2", "--seed", "0", "--out", str(out), "--no-progress",
            "--set", "repetitions=2", "--set", "pgd_steps=2", "--set", "max_epochs=2", "--set", "proxy_batch_size=2",
            "--set", 'proxy_model_options={"max_epochs": 1}', "--set", "backend=reference"]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["preset"] == "authors" and rec["model"]["source"] == "authors"
    assert rec["model"]["form"] == "h∘p∘g"   # their trained projector: the deployed model is stakes' h∘p∘g
    for switch, value in dict(shuffle=False, stop_check="step", stop_start_epoch=1, projector_eval_after_check=True,
                              skip_sr_first_steps=True, bn_train_mode=True, pgd_start="box_sphere",
                              pgd_order="clamp_project", proxy_targets="collision_half", proxy_order="forget_batch",
                              pgd_weight_grads=True, proxy_model="l2ul").items():
        assert rec["config"][switch] == value, switch
    for option, value in dict(importance_step=2, importance_order="loader", importance_reference="train_copy",
                              importance_projector="copy").items():
        assert rec["method_config"][option] == value, option
    assert rec["proxies"]["attacked_model"]["method"] == "l2ul" and rec["proxies"]["n"] == 4
    assert rec["anchors"]["encoder"] == "minilm"
    assert "CLIP" in printed.getvalue() and "MiniLM" in printed.getvalue()
