"""The demo's closing checks: any one failing makes ``dragent demo`` exit non-zero."""

from __future__ import annotations

from agent.demo import failed_checks

ALL_SAME = {"1": True, "2": True}


def test_every_check_passing_is_success() -> None:
    assert failed_checks(1515, 1515, (100, 100), ALL_SAME, 0) == []
    assert failed_checks(1515, 1520, (100, 100), ALL_SAME, 0) == []  # b may hold more


def test_each_failing_check_is_named() -> None:
    (standby,) = failed_checks(1515, 0, (100, 100), ALL_SAME, 0)
    assert standby == "standby rows: region b's standby has 0 of region a's 1515"
    assert failed_checks(1515, None, (100, 100), ALL_SAME, 0)[0].startswith("standby rows")
    (mirror,) = failed_checks(10, 10, (100, 99), ALL_SAME, 0)
    assert mirror == "mirror: region b holds 99 of region a's 100 objects"
    (model,) = failed_checks(10, 10, (1, 1), {"1": True, "2": False}, 0)
    assert model.startswith("model identity: version 2")
    assert failed_checks(10, 10, (1, 1), ALL_SAME, 1) == [
        "vault verification: region b's vault did not verify (see above)"
    ]
    assert len(failed_checks(0, 0, (0, 0), {"1": False, "2": False}, 1)) == 5
