"""The measurement protocol on a fake clock: warm-up excluded, medians and percentiles, the
turns of side-by-side timings."""

import pytest

from vistax.benchmarks import timing


class FakeClock:
    """Each call to `fn` advances the clock by the next of `durations`; `sync` adds `lag`."""

    def __init__(self, durations, lag=0.0):
        self.now = 0.0
        self.durations = list(durations)
        self.lag = lag
        self.calls = []

    def clock(self):
        return self.now

    def fn(self, name="fn"):
        def call():
            self.calls.append(name)
            self.now += self.durations.pop(0)
            return name
        return call

    def sync(self, out):
        self.now += self.lag
        return out


def test_summarize_median_mean_and_percentiles():
    stats = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median"] == 3.0 and stats["mean"] == 3.0
    assert (stats["min"], stats["max"], stats["n"]) == (1.0, 5.0, 5)
    assert stats["p10"] == pytest.approx(1.4) and stats["p90"] == pytest.approx(4.6)
    assert timing.summarize([1.0, 4.0])["median"] == 2.5  # even count: mean of the middle two
    with pytest.raises(ValueError):
        timing.summarize([])


def test_time_calls_excludes_first_and_warmup_and_takes_the_median():
    # first call (compile) 100 s, two more warm-up calls, then 5 timed calls with one outlier.
    fake = FakeClock([100.0, 50.0, 50.0, 2.0, 3.0, 1.0, 40.0, 2.5], lag=0.5)
    result = timing.time_calls(fake.fn(), steps=5, warmup=3, sync=fake.sync, clock=fake.clock)
    assert result["first_s"] == 100.5  # sync time is part of a step
    assert result["seconds"] == [2.5, 3.5, 1.5, 40.5, 3.0]
    assert result["stats"]["median"] == 3.0
    assert len(fake.calls) == 8 and not fake.durations


def test_warmup_zero_still_times_the_first_call_apart():
    fake = FakeClock([9.0, 1.0, 2.0])
    result = timing.time_calls(fake.fn(), steps=2, warmup=0, clock=fake.clock)
    assert result["first_s"] == 9.0 and result["seconds"] == [1.0, 2.0]
    with pytest.raises(ValueError):
        timing.time_calls(fake.fn(), steps=0, warmup=1, clock=fake.clock)


def test_interleaved_takes_turns_with_a_settling_call_after_each_switch():
    # a: first 10, warm-up 1; b: first 20, warm-up 2. Then rounds of (settle, up to 2 timed):
    # a settles 9 and times 1.5, 1.0; b settles 8 and times 2.5, 3.0; a settles 7 and times
    # 1.25; b settles 6 and times 2.0.
    fake = FakeClock([10.0, 1.0, 20.0, 2.0, 9.0, 1.5, 1.0, 8.0, 2.5, 3.0, 7.0, 1.25, 6.0, 2.0])
    out = timing.time_interleaved({"a": (fake.fn("a"), None), "b": (fake.fn("b"), fake.sync)},
                                  steps=3, warmup=2, block=2, clock=fake.clock)
    assert fake.calls == ["a", "a", "b", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert out["a"]["first_s"] == 10.0 and out["b"]["first_s"] == 20.0
    assert out["a"]["seconds"] == [1.5, 1.0, 1.25] and out["b"]["seconds"] == [2.5, 3.0, 2.0]
    assert out["a"]["stats"]["median"] == 1.25 and out["b"]["stats"]["median"] == 2.5
    assert not fake.durations  # no settling call is timed, none is left over


def test_one_implementation_alone_needs_no_settling_calls():
    fake = FakeClock([5.0, 1.0, 2.0, 3.0])
    out = timing.time_interleaved({"a": (fake.fn("a"), None)}, steps=3, warmup=1, block=2,
                                  clock=fake.clock)
    assert out["a"]["seconds"] == [1.0, 2.0, 3.0] and len(fake.calls) == 4


def test_matmul_peak_is_a_positive_rate():
    peak = timing.matmul_peak(64, repeats=1)
    assert peak["numpy"] > 0 and peak["xla"] > 0 and peak["best"] == max(peak["numpy"],
                                                                          peak["xla"])
