"""Scaling fit: recovers known A, alpha, P* from noisy synthetic points; R^2; plots are PNGs."""
import numpy as np
import pytest

from rpt_jax import scaling


@pytest.mark.parametrize("a,alpha,p_star,c_scale", [
    (-40.0, 0.5, 45.0, 1.0),  # accuracy rising towards 45 %, compute in small units
    (-25.0, 0.3, 30.0, 1e18),  # FLOPs-sized compute; A in FLOPs units
    (20.0, 0.8, 5.0, 1e3),  # a falling curve (e.g. a loss) is fitted just as well
])
def test_fit_recovers_known_parameters(a, alpha, p_star, c_scale):
    rng = np.random.default_rng(0)
    compute = c_scale * np.geomspace(1.0, 1e3, 12)
    a_units = a * c_scale ** alpha  # so that A / C^alpha has the same size at every scale
    clean = scaling.power_law(compute, a_units, alpha, p_star)
    noisy = clean + rng.normal(0.0, 0.05, clean.shape)
    fit = scaling.fit_power_law(compute, noisy)
    assert fit.alpha == pytest.approx(alpha, rel=0.05)
    assert fit.p_star == pytest.approx(p_star, abs=0.02 * abs(a) + 0.2)
    assert fit.a == pytest.approx(a_units, rel=0.1)
    assert fit.r2 > 0.99
    assert fit.num_points == 12
    np.testing.assert_allclose(fit(compute), clean, atol=0.2)


def test_r_squared_matches_definition():
    y = np.array([1.0, 2.0, 4.0, 3.0])
    y_hat = np.array([1.5, 2.0, 3.0, 3.0])
    expected = 1 - (0.25 + 0 + 1 + 0) / np.sum((y - y.mean()) ** 2)
    assert scaling.r_squared(y, y_hat) == pytest.approx(expected)
    assert scaling.r_squared(y, y) == 1.0


def test_training_compute_is_six_n_d():
    np.testing.assert_array_equal(scaling.training_compute(1000, [1, 10]), [6000.0, 60000.0])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="distinct"):
        scaling.fit_power_law([1.0, 1.0, 2.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="> 0"):
        scaling.fit_power_law([0.0, 1.0, 2.0, 3.0], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="shape"):
        scaling.fit_power_law([1.0, 2.0, 3.0], [0.1, 0.2])


def test_plots_write_pngs(tmp_path):
    compute = np.geomspace(1e15, 1e17, 5)
    series = {"easy": list(40 - 30 * (compute / 1e15) ** -0.3), "hard": [1, 2, 2.5, 3, 3.2]}
    fits = {"easy": scaling.fit_power_law(compute, series["easy"])}
    p1 = scaling.plot_vs_step([100, 200, 300, 400, 500], series, str(tmp_path / "step.png"))
    p2 = scaling.plot_vs_compute(compute, series, fits, str(tmp_path / "compute.png"))
    for p in (p1, p2):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cumulative_tokens_counts_each_logged_step():
    records = [{"step": 1, "sampled_tokens": 10}, {"step": 2, "sampled_tokens": 20},
               {"step": 4, "sampled_tokens": 30, "prompt_tokens": 5},  # stands for steps 3-4
               {"step": 4, "kind": "eval"}]
    got = scaling.cumulative_tokens(records, [0, 1, 2, 4, 6], prompt_tokens_per_step=100,
                                    tokens_per_step=1000)
    # by hand: 110, +120, +2*35, then 2 unlogged steps at 1000
    np.testing.assert_array_equal(got, [0, 110, 230, 300, 2300])
    np.testing.assert_array_equal(scaling.cumulative_tokens([], [0, 3], 1, 7), [0, 21])
    # a step inside a record's span (or before the first record) counts that record's tokens a
    # step, not the upper bound tokens_per_step: logging.every=10, checkpoints every 25
    every_10 = [{"step": s, "sampled_tokens": 5, "prompt_tokens": 0} for s in (10, 20, 30)]
    np.testing.assert_array_equal(scaling.cumulative_tokens(every_10, [5, 20, 25, 30, 31], 0,
                                                            1000), [25, 100, 125, 150, 1150])
