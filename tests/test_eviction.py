"""The eviction policy on its own: which idle models make room, and when none can."""

from __future__ import annotations

from gateway.eviction import MB, Resident, plan


def r(name, mb, used, **kw) -> Resident:
    return Resident(name, int(mb * MB), used, **kw)


def test_room_to_spare_evicts_nothing():
    p = plan("c", 10 * MB, [r("a", 10, 1)], budget=100 * MB, max_models=None)
    assert p.fits and p.evict == ()


def test_least_recently_used_idle_model_goes_first_and_only_as_many_as_needed():
    residents = [r("a", 40, 3), r("b", 40, 1), r("c", 40, 2)]
    p = plan("d", 40 * MB, residents, budget=130 * MB, max_models=None)
    assert p.fits and p.evict == ("b",)
    assert p.reasons == {"b": "memory_budget"}
    p = plan("d", 80 * MB, residents, budget=130 * MB, max_models=None)
    assert p.fits and p.evict == ("b", "c")


def test_count_limit_evicts_the_oldest_idle_model():
    p = plan("c", MB, [r("a", 1, 2), r("b", 1, 1)], budget=None, max_models=2)
    assert p.fits and p.evict == ("b",) and p.reasons == {"b": "max_loaded_models"}


def test_busy_model_is_never_evicted_even_when_oldest():
    residents = [r("a", 40, 1, busy=True), r("b", 40, 2)]
    p = plan("c", 40 * MB, residents, budget=80 * MB, max_models=None)
    assert p.fits and p.evict == ("b",)


def test_all_busy_means_wait_and_evict_nothing():
    residents = [r("a", 40, 1, busy=True), r("b", 40, 2)]
    # Evicting b alone would not make room for 60 MB: nothing is evicted.
    p = plan("c", 60 * MB, residents, budget=90 * MB, max_models=None)
    assert not p.fits and p.evict == () and p.never is None
    assert "a (40 MB, busy)" in p.waiting_for
    p = plan("c", MB, [r("a", 1, 1, busy=True), r("b", 1, 2, busy=True)], budget=None, max_models=2)
    assert not p.fits and "--max-loaded-models is 2" in p.waiting_for


def test_loading_and_unloading_models_are_not_candidates():
    residents = [r("a", 40, 1, evictable=False), r("b", 40, 2, evictable=False)]
    p = plan("c", 40 * MB, residents, budget=80 * MB, max_models=None)
    assert not p.fits and p.never is None


def test_pinned_models_stay_and_their_memory_is_never_available():
    residents = [r("a", 50, 1, pinned=True), r("b", 20, 2)]
    p = plan("c", 40 * MB, residents, budget=100 * MB, max_models=None)
    assert p.fits and p.evict == ("b",)
    p = plan("c", 60 * MB, residents, budget=100 * MB, max_models=None)
    assert not p.fits and p.never is not None and "pinned" in p.never
    p = plan("c", MB, [r("a", 1, 1, pinned=True)], budget=None, max_models=1)
    assert not p.fits and "pinned" in p.never


def test_a_model_larger_than_the_budget_never_fits_and_the_numbers_are_named():
    p = plan("big", 300 * MB, [], budget=200 * MB, max_models=None)
    assert not p.fits
    assert p.never == "model big needs about 300 MB, more than the whole memory budget of 200 MB"


def test_no_limits_always_fit():
    residents = [r(str(i), 1000, i) for i in range(50)]
    assert plan("x", 10**12, residents, budget=None, max_models=None).fits
