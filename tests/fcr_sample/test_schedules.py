import pytest
from fcr_sample import FASTER_DIFFUSION_KEY_STEPS, EncoderCacheConfig, decoder_groups, key_steps


def test_uniform_stride_starts_at_zero_and_steps_by_k():
    assert key_steps(50, stride=10) == [0, 10, 20, 30, 40]
    assert key_steps(7, stride=3) == [0, 3, 6]
    assert key_steps(5, stride=1) == [0, 1, 2, 3, 4]


def test_published_faster_diffusion_schedules():
    assert key_steps(50, schedule="faster-diffusion") == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert key_steps(20, schedule="faster-diffusion") == [0, 1, 2, 3, 5, 10, 15]
    assert FASTER_DIFFUSION_KEY_STEPS[50][-1] == 35


def test_first_n_always_key_is_added_to_any_schedule():
    assert key_steps(20, stride=10, always_key_first=3) == [0, 1, 2, 10]
    assert key_steps(20, steps=[0, 8], always_key_first=2) == [0, 1, 8]


def test_explicit_list_is_sorted_and_deduplicated():
    assert key_steps(10, steps=[5, 0, 5, 2]) == [0, 2, 5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stride=0), "stride must be an integer >= 1"),
        (dict(stride=2.5), "stride must be an integer >= 1"),
        (dict(steps=[1, 2]), "must start at step 0"),
        (dict(steps=[0, 10]), "out of range for 10 steps; allowed are 0..9"),
        (dict(schedule="fd"), "unknown schedule 'fd'; allowed are"),
        (dict(schedule="faster-diffusion", stride=None), "exists for \\[20, 50\\] steps, not 10"),
    ],
)
def test_bad_schedules_raise_value_errors_that_say_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        key_steps(10, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stride=0), "stride must be an integer >= 1"),
        (dict(key_steps=(2, 4)), "must include step 0"),
        (dict(schedule="nonuniform"), "allowed are"),
        (dict(max_parallel_steps=0), "max_parallel_steps must be >= 1"),
        (dict(prior_noise_tau=2.0), "in \\[0, 1\\]"),
    ],
)
def test_bad_config_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncoderCacheConfig(**kwargs)


def test_decoder_groups_cover_every_step_once_and_respect_the_cap():
    keys = key_steps(23, stride=10)
    for cap in (None, 1, 3, 10):
        batches = decoder_groups(keys, 23, cap)
        flat = [s for b in batches for s in b]
        assert flat == list(range(23))
        assert all(len(b) <= (cap or 23) for b in batches)
        # a batch never crosses a key step: only its first element may be key
        assert all(s not in keys for b in batches for s in b[1:])
    assert decoder_groups([0, 5], 8, 3) == [[0, 1, 2], [3, 4], [5, 6, 7]]


@pytest.mark.parametrize(
    "config, label, stride, keys20",
    [
        (EncoderCacheConfig(stride=5), "FD-5", 5, [0, 5, 10, 15]),
        (EncoderCacheConfig(stride=7, schedule="faster-diffusion"), "FD-published", None,
         [0, 1, 2, 3, 5, 10, 15]),  # the stride is ignored, and the label says so
        (EncoderCacheConfig(stride=5, key_steps=(0, 9), parallel_decoding=False), "FD-custom-seq", None, [0, 9]),
    ],
)
def test_config_exposes_its_effective_schedule(config, label, stride, keys20):
    assert config.label == label
    assert config.effective_stride == stride
    assert config.key_steps_for(20) == keys20
