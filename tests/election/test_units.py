"""The voter and the election state machine on their own: votes once per term (also across a
restart, through the vote file), bad inputs refused with typed errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from keyval.commander.election import Election, Role, Won
from keyval.drone.vote import Follow, Reply, Vote, VoteFile, VoteFileError, Voter
from wire.errors import BadRequest, Forbidden

ELECTORATE = frozenset({"drone-1", "drone-2", "drone-3"})


def test_a_drone_votes_once_per_term_even_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "vote.json"
    voter = Voter("drone-1", VoteFile(path))
    assert voter.on_reply(Reply("commander-1", "candidate", 4, 100)) == Vote("commander-1", 4)
    assert voter.on_reply(Reply("commander-2", "candidate", 4, 100)) is None
    restarted = Voter("drone-1", VoteFile(path))
    assert (restarted.term, restarted.voted_for) == (4, "commander-1")
    assert restarted.on_reply(Reply("commander-2", "candidate", 4, 100)) is None
    assert restarted.on_reply(Reply("commander-2", "candidate", 5, 100)) == Vote("commander-2", 5)


def test_a_drone_echoes_only_the_commander_it_supports() -> None:
    voter = Voter("drone-1")
    voter.on_reply(Reply("commander-1", "candidate", 1, 100))
    assert voter.ack_for("commander-1") == 100 and voter.ack_for("commander-2") == 0
    assert voter.on_reply(Reply("commander-1", "leader", 1, 150)) == Follow("commander-1", 1)
    voter.leader_lost()
    voter.on_reply(Reply("commander-2", "candidate", 2, 300))
    assert voter.ack_for("commander-1") == 0 and voter.ack_for("commander-2") == 300


def test_a_drone_ignores_a_leader_of_an_older_term() -> None:
    voter = Voter("drone-1")
    voter.on_reply(Reply("commander-2", "candidate", 3, 100))
    assert voter.on_reply(Reply("commander-1", "leader", 2, 100)) is None
    assert voter.leader == ""


@pytest.mark.parametrize(
    "content", [b"not json", b"[]", b'{"term": -1, "voted_for": ""}', b'{"term": 1}', b" " * 5000]
)
def test_a_bad_vote_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vote.json"
    path.write_bytes(content)
    with pytest.raises(VoteFileError):
        Voter("drone-1", VoteFile(path))


def test_a_negative_reply_is_refused() -> None:
    with pytest.raises(ValueError):
        Voter("drone-1").on_reply(Reply("commander-1", "leader", -1, 0))


def test_only_the_electorate_votes_and_terms_are_bounded() -> None:
    election = Election("commander-1", ELECTORATE, random.Random(1))
    with pytest.raises(Forbidden):
        election.ballot("intruder", 1, "commander-1", 0, 0.0)
    with pytest.raises(BadRequest):
        election.ballot("drone-1", 10**12, "", 0, 0.0)
    with pytest.raises(ValueError):
        Election("commander-1", frozenset(), random.Random(1))


def test_a_majority_of_the_known_drones_wins_not_of_those_reached() -> None:
    election = Election("commander-1", ELECTORATE, random.Random(1))
    election.stand(0.0)
    _, instructions = election.ballot("drone-1", 1, "commander-1", 0, 0.001)
    assert instructions == [] and election.role is Role.CANDIDATE  # 1 of 3 is no majority
    _, instructions = election.ballot("drone-2", 1, "commander-1", 0, 0.002)
    assert instructions == [Won(1)] and election.role is Role.LEADER


def test_one_drone_alone_cannot_start_an_election() -> None:
    election = Election("commander-1", ELECTORATE, random.Random(1))
    for step in range(100):
        election.ballot("drone-1", 0, "", 0, step * 0.05)
        election.tick(step * 0.05)
    assert election.role is Role.FOLLOWER and election.term == 0
