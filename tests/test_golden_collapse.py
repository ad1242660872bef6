"""Causality of the golden collapse pairs: the blamed setting the ablation names removes the
collapse; a blamed setting the ablation clears does not (seed 0, one run each).

The full table (5 seeds, every ablation) is ``python -m reference_models.pairs ablations``;
docs/golden.md holds its measured result. Here one decisive and one non-decisive restoration
per system keep the claim honest: a change that makes every ablation "fix" the run, or none,
fails.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict

import pytest

from reference_models.golden_runs import RUNS
from reference_models.pairs import collapse_shown, shown_in
from tests.shared_group import shared_run_curves

# (system, restored setting, does restoring it alone remove the collapse?)
ABLATION_FACTS = [
    ("hyperlora", "clamp", True),
    ("hyperlora", "lr_multiplier", True),         # ... though the norm still runs away
    ("staged_modules", "use_reentrant=False", True),
    ("staged_modules", "staging (module_start_epoch=2)", False),  # the seed's claim, refuted
    ("curriculum_lm", "grokfast_lambda", True),
    ("curriculum_lm", "clipping", False),
    ("lora_init", "zero_init_b", True),
]


@pytest.mark.golden
@pytest.mark.parametrize("system, setting, removes", ABLATION_FACTS,
                         ids=[f"{s}-{k}" for s, k, _ in ABLATION_FACTS])
def test_restoring_one_blamed_setting(system, setting, removes, request, tmp_path_factory):
    collapse = importlib.import_module(f"reference_models.{system}.collapse")
    cfg = collapse.ABLATIONS[setting]
    # an ablation that restores a system's only blamed setting IS its fixed run: read the
    # session's shared execution of that golden (same training function, config and seed)
    same = [r for r in RUNS if r.config.get("system") == system and r.seed == 0
            and r.config["cfg"] == asdict(cfg)]
    shown = (shown_in(system, shared_run_curves(tmp_path_factory, request, same[0])) if same
             else collapse_shown(system, cfg, seed=0))
    assert shown["collapsed"] is (not removes), (
        f"{system}: restoring {setting!r} alone should {'remove' if removes else 'leave'} the "
        f"collapse; critical findings: {shown['critical']}")
    if system == "hyperlora" and setting == "lr_multiplier":
        # ... restoring the lr multiplier leaves the runaway but removes the downstream collapse
        assert ("lora_norm_kill", "lora_norm") in shown["critical"]
        assert ("divergence", "loss") not in shown["critical"]


@pytest.mark.golden
@pytest.mark.parametrize("system", ["hyperlora", "staged_modules", "curriculum_lm", "lora_init"])
def test_every_ablation_is_the_broken_config_with_one_setting_restored(system):
    collapse = importlib.import_module(f"reference_models.{system}.collapse")
    fixed, broken = asdict(collapse.FIXED), asdict(collapse.BROKEN)
    blamed = {k for k in fixed if fixed[k] != broken[k]}
    assert blamed, f"{system}: FIXED and BROKEN do not differ"
    for name, cfg in collapse.ABLATIONS.items():
        changed = {k for k, v in asdict(cfg).items() if v != broken[k]}
        assert changed and changed <= blamed, (name, changed, blamed)
        assert all(asdict(cfg)[k] == fixed[k] for k in changed), name
