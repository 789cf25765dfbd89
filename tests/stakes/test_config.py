import pytest
import torch

from stakes.config import UnlearnConfig, preset


def test_presets_differ_where_the_method_says():
    stable, paper = preset("stable"), preset("paper")
    assert stable.eps is None and stable.proximal and stable.grad_clip == 2.0
    assert stable.warm_start and stable.deletion == "margin" and stable.deletion_path == "deployed"
    assert stable.loss_weighting == "equal"
    assert paper.eps == 3.0 and paper.deletion == "ascent" and not paper.proximal and paper.grad_clip is None
    assert not paper.warm_start and paper.deletion_path == "features_head" and paper.loss_weighting == "batch_fraction"
    assert (paper.lr, paper.projector_lr, paper.lam) == (0.005, 0.009, 1.0)
    # the paper's baselines use their own optimiser (METHOD.md §10)
    adv = preset("paper", method="adv")
    assert (adv.lr, adv.momentum, adv.weight_decay, adv.eps) == (0.001, 0.9, 1e-4, 4.0)
    # stable applies to every method alike
    assert preset("stable", method="adv").lr == stable.lr


def test_overrides_and_round_trip():
    cfg = preset("stable", lam=10.0, seed=3)
    assert cfg.lam == 10.0 and cfg.seed == 3 and cfg.preset == "stable"
    again = UnlearnConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.replace(lr=0.1).lr == 0.1


@pytest.mark.parametrize("field,value,match", [
    ("lr", 0.0, "config.lr"),
    ("lr", float("nan"), "config.lr"),
    ("momentum", 1.0, "config.momentum"),
    ("repetitions", 0, "config.repetitions"),
    ("repetitions", 2.5, "config.repetitions"),
    ("deletion", "sideways", "config.deletion"),
    ("importance", "random", "config.importance"),
    ("backend", "cuda", "config.backend"),
    ("target_success", 1.5, "config.target_success"),
    ("eps", -1.0, "config.eps"),
])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        preset("stable", **{field: value})


def test_unknown_names():
    with pytest.raises(ValueError, match="preset"):
        preset("fast")
    with pytest.raises(ValueError, match="unknown config field"):
        preset("stable").replace(learning_rate=0.1)
    with pytest.raises(ValueError, match="bad config override"):
        preset("stable", learning_rate=0.1)


def test_deterministic_runs_switch_on_deterministic_algorithms(digits_model, forget_set, fast_config):
    """config.deterministic: deterministic cuDNN and torch algorithms during the run, restored after."""
    import stakes

    seen = []

    def record(entry):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark))

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    result = stakes.unlearn(digits_model, forget_set, method="adv", config=fast_config(deterministic=True),
                            callbacks=[record])
    assert seen and all(s == (True, True, False) for s in seen)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before
    assert result.config["deterministic"] is True
    seen.clear()
    stakes.unlearn(digits_model, forget_set, method="adv", config=fast_config(), callbacks=[record])
    assert seen and all(s[0] is before[0] for s in seen)
    with pytest.raises(ValueError, match="config.deterministic must be True or False"):
        fast_config(deterministic="yes")
