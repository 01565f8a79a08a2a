"""A drone's side of the commander election (docs/design.md, "Commander election"): sans-I/O.

The drone follows one leader. While it has one, it votes for nobody. When its heartbeats have
gone unanswered for `LEADER_TIMEOUT_MS` (or the leader said it no longer leads), it drops the
leader for good and ballots every commander each `BALLOT_PERIOD_MS`:

- a commander that leads a term >= ours becomes our leader;
- a candidate in a term above ours (or in ours, if we voted for it) gets our vote: the term
  and vote are stored (`VoteFile`) before the ballot that carries them is sent, so a restarted
  drone never votes twice in a term;
- each commander's reply carries its clock (`sent_ms`); the drone echoes the last one it got
  from the commander it supports (the candidate it voted for, then the leader it follows), and
  nothing to any other. Once the drone drops a leader it never echoes to it again: that is
  what lets a deposed leader's lease on a majority lapse.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# A drone drops its leader after this long without a heartbeat answer: three heartbeat periods,
# well under the grant lease (570 ms on the drone's clock), so the election overlaps the lease.
LEADER_TIMEOUT_MS = 300

# A leaderless drone ballots every commander this often.
BALLOT_PERIOD_MS = 50

# A vote file is two small fields; anything larger is not ours.
MAX_VOTE_FILE_BYTES = 4096


class VoteFileError(Exception):
    """The persisted vote cannot be read: refusing to start beats voting twice in a term."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A commander's answer to a ballot (keyval.messages.BallotReply, decoded)."""

    commander: str
    role: str  # "leader" | "candidate" | "follower"
    term: int
    sent_ms: int


@dataclass(frozen=True, slots=True)
class Follow:
    commander: str
    term: int


@dataclass(frozen=True, slots=True)
class Vote:
    """Send the candidate another ballot at once: it carries the vote just stored."""

    commander: str
    term: int


Decision = Follow | Vote | None


class VoteFile:
    """(term, voted_for) on disk, written atomically (temp file, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[int, str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0, ""
        if len(raw) > MAX_VOTE_FILE_BYTES:
            raise VoteFileError(f"{self.path}: larger than {MAX_VOTE_FILE_BYTES} bytes")
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise VoteFileError(f"{self.path}: not JSON ({error})") from None
        term = data.get("term") if isinstance(data, dict) else None
        voted_for = data.get("voted_for") if isinstance(data, dict) else None
        if type(term) is not int or term < 0 or not isinstance(voted_for, str):
            raise VoteFileError(f"{self.path}: expected {{term: int >= 0, voted_for: str}}")
        return term, voted_for

    def store(self, term: int, voted_for: str) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"term": term, "voted_for": voted_for}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


class Voter:
    def __init__(self, name: str, vote_file: VoteFile | None = None) -> None:
        self.name = name
        self._file = vote_file
        self.term, self.voted_for = vote_file.load() if vote_file else (0, "")
        self.leader = ""  # the commander we follow ("" while leaderless)
        self._acks: dict[str, int] = {}  # commander -> last sent_ms it gave us

    @property
    def supported(self) -> str:
        """The one commander we echo acks to: our leader, else the candidate we voted for."""
        return self.leader or self.voted_for

    def ack_for(self, commander: str) -> int:
        return self._acks.get(commander, 0) if commander == self.supported else 0

    def on_reply(self, reply: Reply) -> Decision:
        """A commander answered a ballot."""
        if reply.term < 0 or reply.sent_ms < 0:
            raise ValueError("a commander sent a negative term or time")
        if reply.role == "leader" and (
            reply.term > self.term or (reply.term == self.term and not self.leader)
        ):
            self._adopt_term(reply.term)
            self.leader = reply.commander
            self._acks[reply.commander] = reply.sent_ms
            return Follow(reply.commander, reply.term)
        if self.leader:
            return None
        if reply.role == "candidate" and (
            reply.term > self.term
            or (reply.term == self.term and self.voted_for in ("", reply.commander))
        ):
            fresh = (reply.term, reply.commander) != (self.term, self.voted_for)
            if fresh:
                self._store(reply.term, reply.commander)
            self._acks[reply.commander] = reply.sent_ms
            return Vote(reply.commander, reply.term) if fresh else None
        return None

    def follow_without_election(self, commander: str) -> Follow:
        """The commander does not know ballots (BAD_REQUEST: it predates elections, a lone
        commander): follow it in our current term. Votes and terms stay as they are."""
        self.leader = commander
        return Follow(commander, self.term)

    def on_heartbeat_reply(self, commander: str, sent_ms: int) -> None:
        if commander == self.leader:
            self._acks[commander] = max(sent_ms, self._acks.get(commander, 0))

    def leader_lost(self) -> None:
        """Heartbeats failed for LEADER_TIMEOUT_MS, or the leader said it no longer leads."""
        if self.leader:
            self._acks.pop(self.leader, None)
        self.leader = ""

    def _adopt_term(self, term: int) -> None:
        if term > self.term:
            self._store(term, "")

    def _store(self, term: int, voted_for: str) -> None:
        if term < self.term:
            raise RuntimeError(f"invariant: term {term} below {self.term}")
        if self._file is not None:
            self._file.store(term, voted_for)
        self.term, self.voted_for = term, voted_for
