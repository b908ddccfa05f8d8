"""StepProfiler: a trace starts at logging.profile_start, covers profile_steps steps, and stops
when a run ends or fails inside that window."""
import jax
import pytest

from rpt_jax import profiling


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: seen.append(("start", d)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: seen.append(("stop",)))
    return seen


def run(profiler, steps, calls, fail_at=None):
    traced = []
    for s in steps:
        with profiler.step(s):
            if fail_at == s:
                raise RuntimeError("boom")
            traced.append((s, profiler.active))
    return traced


def test_window_of_steps(calls, tmp_path):
    p = profiling.StepProfiler(str(tmp_path / "profile"), start=2, steps=2)
    traced = run(p, range(6), calls)
    assert [s for s, active in traced if active] == [2, 3]
    assert calls == [("start", str(tmp_path / "profile")), ("stop",)]
    p.close()
    assert calls[-1] == ("stop",) and len(calls) == 2  # closing twice stops nothing more


def test_off_and_resumed_past_the_window(calls, tmp_path):
    run(profiling.StepProfiler(str(tmp_path), start=-1, steps=3), range(4), calls)
    run(profiling.StepProfiler(str(tmp_path), start=1, steps=3), range(5, 8), calls)
    assert calls == []


def test_resumed_inside_the_window_traces_the_rest(calls, tmp_path):
    p = profiling.StepProfiler(str(tmp_path), start=2, steps=4)  # steps 2..5
    traced = run(p, range(4, 8), calls)
    assert [s for s, active in traced if active] == [4, 5]
    assert calls == [("start", str(tmp_path)), ("stop",)]


def test_a_failing_step_inside_the_window_is_closed_by_the_caller(calls, tmp_path):
    p = profiling.StepProfiler(str(tmp_path), start=0, steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        run(p, range(5), calls, fail_at=1)
    assert calls == [("start", str(tmp_path))] and p.active
    p.close()  # what the trainer's `finally` does
    assert calls[-1] == ("stop",) and not p.active
