import pytest
import torch

import stakes
from stakes.config import UnlearnConfig, preset
from stakes.methods import UnlearningMethod, get_method, route_options


def test_presets_differ_where_the_method_says():
    stable, paper = preset("stable"), preset("paper")
    assert stable.eps is None and stable.proximal and stable.grad_clip == 2.0
    assert stable.deletion == "margin" and stable.loss_weighting == "equal"
    assert paper.eps == 3.0 and paper.deletion == "ascent" and not paper.proximal and paper.grad_clip is None
    assert paper.loss_weighting == "batch_fraction" and (paper.lr, paper.lam) == (0.005, 1.0)
    # StructGuard's own options and their presets
    sg = get_method("structguard")
    s_opts, p_opts = sg.options_for(stable), sg.options_for(paper)
    assert s_opts.warm_start and s_opts.deletion_path == "deployed" and s_opts.projector_lr == 0.0
    assert not p_opts.warm_start and p_opts.deletion_path == "features_head" and p_opts.projector_lr == 0.009
    # the paper's baselines use their own optimiser (METHOD.md §10)
    adv = stakes.preset("paper", method="adv")
    assert (adv.lr, adv.momentum, adv.weight_decay, adv.eps) == (0.001, 0.9, 1e-4, 4.0)
    # stable applies to every method alike
    assert stakes.preset("stable", method="adv").lr == stable.lr == stakes.preset("stable").lr


def test_overrides_and_round_trip():
    cfg = stakes.preset("stable", lam=10.0, seed=3, align_weight=2.0)
    assert cfg.lam == 10.0 and cfg.seed == 3 and cfg.preset == "stable"
    assert cfg.method_options == {"structguard": {"align_weight": 2.0}}
    assert get_method("structguard").options_for(cfg).align_weight == 2.0
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
    ("backend", "cuda", "config.backend"),
    ("target_success", 1.5, "config.target_success"),
    ("eps", -1.0, "config.eps"),
    ("importance", "random", "structguard.importance"),
    ("importance_topq", 0.0, "structguard.importance_topq"),
    ("deletion_path", "sideways", "structguard.deletion_path"),
    ("method_options", {"structguard": 1}, "config.method_options"),
])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        stakes.preset("stable", **{field: value})


def test_unknown_names():
    with pytest.raises(ValueError, match="preset"):
        preset("fast")
    with pytest.raises(ValueError, match="unknown config field"):
        preset("stable").replace(learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        stakes.preset("stable", learning_rate=0.1)
    # a method's own option is not a shared one, and says where it goes
    with pytest.raises(ValueError, match="method_options"):
        preset("stable", align_weight=2.0)
    with pytest.raises(ValueError, match=r"an option of \['structguard'\], not of \['adv'\]"):
        stakes.preset("stable", method="adv", align_weight=2.0)
    with pytest.raises(ValueError, match="stakes.preset"):
        preset("paper", method="adv")
    # an unknown option in method_options is refused when the run resolves it, naming the method
    cfg = preset("stable").with_method_options("structguard", align_wieght=1.0)
    with pytest.raises(ValueError, match="method 'structguard': unknown method option"):
        get_method("structguard").options_for(cfg)


def test_set_values_route_to_the_shared_config_or_a_method():
    sg, salun, adv = (get_method(m) for m in ("structguard", "salun", "adv"))
    shared, own = route_options({"lr": 0.1, "structguard.align_weight": 3, "saliency_q": 0.2, "projector_lr": 0.01},
                                [sg, salun, adv])
    assert shared == {"lr": 0.1}
    assert own == {"structguard": {"align_weight": 3, "projector_lr": 0.01}, "salun": {"saliency_q": 0.2}}
    with pytest.raises(ValueError, match="'salun' is not a method of this run"):
        route_options({"salun.saliency_q": 0.2}, [sg])
    with pytest.raises(ValueError, match="method 'structguard' has no option 'saliency_q'"):
        route_options({"structguard.saliency_q": 0.2}, [sg, salun])
    both = type("Both", (UnlearningMethod,), {"config_class": sg.config_class, "name": "both",
                                              "loss_terms": lambda self, ctx, batch: {}})()
    with pytest.raises(ValueError, match="several methods here .*structguard.align_weight or both.align_weight"):
        route_options({"align_weight": 2}, [sg, both])


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
