"""Golden runs of seed 004 (``evolving_context``): the fixed and the broken collapse run.

The runs themselves (task, model, horizon, the fixed/broken configs that differ only in what
the seed blames, the ablations, the checks and the note) are in ``collapse.py``. The broken
run must show the seed's downstream collapse (loss divergence after the z_e instability) as a
critical finding; the fixed run must show no finding at all (docs/golden.md).

Both runs are recorded on seed 3: the broken run's critical divergence holds on seeds 0-3;
seed 4 spikes x22 and stays 2.8x above its best, but only as a loss spike warning (the spike
raises the divergence rule's noise estimate; 4/5 seeds, collapse.NOTE). Seed 3 is the one
that collapsed at every warm-up length tried. ``invariants golden --sweep 5`` shows all five.
"""
from __future__ import annotations


from invariants import GoldenTolerance
from reference_models.evolving_context import collapse
from reference_models.golden_common import EXACT, collapse_pair, rel

BROKEN_SIGNATURES = (("divergence", "loss"),)
GOLDEN_SEED = 3

# world size 2 (golden_common): measured max relative deviation, fixed run before step 400, in
# the comments (torch 2.13.0+cpu, gloo, 2 ranks); the broken run logs no point before its
# horizon (the first logged point, step 225, is the mean over steps 201-225)
DISTRIBUTED_TOLERANCES: dict[str, GoldenTolerance] = {
    "loss": rel(3e-7),                   # 7.29e-8 (step 300)
    "grad_norm": rel(8e-7),              # 1.95e-7 (step 300)
    "grad_norm_encoder": rel(4e-6),      # 7.81e-7 (step 300)
    "encoder_grad_share": rel(3e-6),     # 5.86e-7 (step 300)
    "z_e_step_change": rel(2e-6),        # 3.58e-7 (step 300)
    "z_e_step_change_pct": rel(2e-6),    # 3.79e-7 (step 300)
    "lr": EXACT}
# both runs' dynamics amplify DDP's float32 rounding: compared before these steps (the first
# logged step at which a metric's deviation exceeds a tenth of its world-size-1 tolerance,
# rtol 1e-5 / atol 1e-6)
DISTRIBUTED_HORIZON_FIXED: tuple[int, str] = (400, (
    "the lr warm-up to 4e-2 amplifies the rounding. Measured relative deviation (v2 run, "
    "100-step points, warm-up 500): <= 7.8e-7 to step 300, grad_norm_encoder 8.9e-5 at step "
    "400, 1.4-7.1 % at step 500; this run (25-step points, warm-up 750): within the table "
    "before step 400, up to 0.33 (loss, step 1275) after it. The seed's good bands, the "
    "falling loss and the absence of findings still hold on rank 0"))
DISTRIBUTED_HORIZON: tuple[int, str] = (200, (
    "no EMA, alpha 1, query not detached, encoder lr x1: the unstable context amplifies the "
    "rounding within the first logged window. Measured relative deviation of the per-step "
    "loss: <= 4.4e-7 to step 125, 5.7e-5 at step 150, 9.6e-5 at 200, 3.0e-2 at 300; logged "
    "points: <= 8.3e-6 at step 200 (over a tenth of the world-size-1 tolerance), 5.6e-3 at "
    "300, up to 0.28 (loss) by step 500 (v2 run); this run logs from step 225, so no point "
    "is compared: rank 0 differs by up to 45 % (loss, step 575) and 105 % (z_e step change)"))

# beyond the horizon the broken run's loss divergence is chaotic, not a property of the
# rounding-free trajectory alone (measured on the v2 run, world size 1): nudging one initial
# decoder weight by one ulp moved the divergence from step 1000 to step 700 / 600, or removed
# it (max rise x1.13) (3 weights tried); this run: which seeds collapse depends on the
# warm-up length (collapse.NOTE)
DISTRIBUTED_CHAOTIC = (
    "the loss divergence after the z_e instability is chaotic: a 1-ulp change of one initial "
    "decoder weight moved the largest loss rise from step 1000 to 700 or 600, or removed it "
    "(x1.13 < the x1.2 the check asks; measured on 3 weights, v2 run), and which seeds "
    "collapse depends on the warm-up length; rank 0 at world size 2 differs from the golden "
    "by up to 45 % (loss). The collapse is asserted at world size 1 and on 5 seeds by the "
    "sweep")

RUNS = collapse_pair("evolving_context", collapse, seed=GOLDEN_SEED,
                     broken_signatures=BROKEN_SIGNATURES,
                     distributed_tolerances=DISTRIBUTED_TOLERANCES,
                     distributed_horizon=DISTRIBUTED_HORIZON,
                     fixed_distributed_horizon=DISTRIBUTED_HORIZON_FIXED,
                     broken_distributed_chaotic=DISTRIBUTED_CHAOTIC)
