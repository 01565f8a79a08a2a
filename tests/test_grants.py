"""Grant MACs, and the verifier that remembers the grants it verified."""

from __future__ import annotations

import pytest

from keyval.grants import MAX_VERIFIED_GRANTS, Grant, GrantVerifier, sign_grant
from wire.errors import Unauthorized

KEY, OTHER_KEY = b"k" * 32, b"o" * 32


def grant(term: int = 1, epoch: int = 1, *, key: bytes = KEY, drone: str = "drone-1") -> Grant:
    return sign_grant(Grant(drone, term, ((0, 99, epoch),), 0), key)


def test_a_grant_verifies_once_and_is_remembered() -> None:
    verifier = GrantVerifier(KEY)
    verifier.verify(grant(), drone="drone-1")
    verifier.verify(grant(), drone="drone-1")  # an equal grant decoded from another request
    assert len(verifier) == 1
    verifier.verify(grant(epoch=2), drone="drone-1")
    assert len(verifier) == 2


def test_a_remembered_mac_on_altered_fields_is_refused() -> None:
    verifier = GrantVerifier(KEY)
    good = grant()
    verifier.verify(good, drone="drone-1")
    for altered in (
        Grant(good.drone, 2, good.ranges, good.issued_ms, good.mac),
        Grant(good.drone, good.term, ((0, 99, 9),), good.issued_ms, good.mac),
        Grant("drone-2", good.term, good.ranges, good.issued_ms, good.mac),
    ):
        with pytest.raises(Unauthorized, match="MAC"):
            verifier.verify(altered, drone=altered.drone)
    assert len(verifier) == 1


def test_a_remembered_grant_presented_by_another_drone_is_refused() -> None:
    verifier = GrantVerifier(KEY)
    verifier.verify(grant(), drone="drone-1")
    with pytest.raises(Unauthorized, match="drone-2"):
        verifier.verify(grant(), drone="drone-2")


def test_a_grant_refused_is_not_remembered() -> None:
    verifier = GrantVerifier(KEY)
    with pytest.raises(Unauthorized, match="MAC"):
        verifier.verify(grant(key=OTHER_KEY), drone="drone-1")
    with pytest.raises(Unauthorized, match="drone-2"):
        verifier.verify(grant(drone="drone-2"), drone="drone-1")
    assert len(verifier) == 0


def test_a_new_key_forgets_every_grant() -> None:
    verifier = GrantVerifier(KEY)
    verifier.verify(grant(), drone="drone-1")
    verifier.set_key(KEY)  # the same key: nothing forgotten
    assert len(verifier) == 1
    verifier.set_key(OTHER_KEY)
    assert len(verifier) == 0
    assert verifier.key == OTHER_KEY
    with pytest.raises(Unauthorized, match="MAC"):
        verifier.verify(grant(), drone="drone-1")
    verifier.verify(grant(key=OTHER_KEY), drone="drone-1")


def test_the_verifier_remembers_a_bounded_number_of_grants() -> None:
    verifier = GrantVerifier(KEY)
    first = grant(term=1)
    for term in range(1, MAX_VERIFIED_GRANTS + 11):
        verifier.verify(grant(term=term), drone="drone-1")
    assert len(verifier) == MAX_VERIFIED_GRANTS
    verifier.verify(first, drone="drone-1")  # forgotten, verified again with its MAC
    assert len(verifier) == MAX_VERIFIED_GRANTS
