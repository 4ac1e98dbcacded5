"""The rating service: one-time signed presentations, refusals, per-rater order."""

from __future__ import annotations

from pathlib import Path

import pytest
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.rating import RatingService, UnknownRater, VoteRefused
from fcr_human_study.store import StudyStore


@pytest.fixture
def service(results_store: Path, tmp_path: Path):
    study = tmp_path / "study.duckdb"
    build_study(results_store, study, n_pairs=40, attention_share=0.1, pairs_per_rater=20)
    service = RatingService(StudyStore(study, idle_close_s=0.5))
    service.tokens = [t for _, t in add_raters(study, 4)]
    yield service
    service.store.close()


def votes(service: RatingService) -> int:
    return service.store.query("SELECT count(*) FROM votes")[0][0]


def test_a_rater_never_sees_a_pair_twice_and_gets_attention_checks(service):
    rater = service.rater_for_token(service.tokens[0])
    seen = []
    while (p := service.current(rater)) is not None:
        assert service.current(rater) == p  # asking again returns the same open presentation
        seen.append(p.pair_id)
        service.vote(rater, p.token, "tie")
    assert len(seen) == len(set(seen)) == 20
    assert service.progress(rater) == (20, 20)
    n_att = service.store.query(
        "SELECT count(*) FROM votes JOIN pairs USING (pair_id) WHERE is_attention AND rater_id = ?",
        [rater])[0][0]
    assert n_att == 2  # one in each block of 10


def test_left_right_order_is_random_per_rater(service):
    sides = set()
    for token in service.tokens:
        rater = service.rater_for_token(token)
        for _ in range(10):
            p = service.current(rater)
            sides.add(service.store.query(
                "SELECT left_side FROM presentations WHERE presentation_id = ?",
                [p.token.split(".")[1]])[0][0])
            service.vote(rater, p.token, "left")
    assert sides == {"a", "b"}
    # "left" is stored as whichever side was shown left.
    assert service.store.query("SELECT count(*) FROM votes WHERE choice <> left_side")[0][0] == 0


def test_forged_replayed_foreign_and_unknown_votes_are_refused(service):
    r1, r2 = (service.rater_for_token(t) for t in service.tokens[:2])
    p1, p2 = service.current(r1), service.current(r2)
    pair_id, pres_id, sig = p1.token.split(".")
    forged = f"{pair_id}.{pres_id}.{'0' * 64}"
    with pytest.raises(VoteRefused, match="forged"):
        service.vote(r1, forged, "left")
    with pytest.raises(VoteRefused, match="unknown pair"):
        service.vote(r1, f"p{'1' * 16}.{pres_id}.{sig}", "left")
    with pytest.raises(VoteRefused, match="malformed"):
        service.vote(r1, "../../etc/passwd", "left")
    with pytest.raises(VoteRefused, match="forged or foreign"):
        service.vote(r1, p2.token, "left")  # another rater's presentation
    with pytest.raises(VoteRefused, match="unknown choice"):
        service.vote(r1, p1.token, "VARZEBRA")
    assert votes(service) == 0
    service.vote(r1, p1.token, "right")
    with pytest.raises(VoteRefused, match="replayed"):
        service.vote(r1, p1.token, "left")
    assert votes(service) == 1


def test_unknown_token_and_admin_secret(service):
    with pytest.raises(UnknownRater):
        service.rater_for_token("not-a-token")
    with pytest.raises(UnknownRater):
        service.rater_for_token("")
    assert not service.admin_ok("guess")
    assert not service.admin_ok("")
