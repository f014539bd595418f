"""Tests of trust.py: the agreement score and the adaptive replication rule, pure logic (no
HTTP, no store), with an injected random source."""
import random

import pytest

import trust
from trust import Opinion, Status, Verifier, agreement

BLOCK = 65536


def bitmap(ones) -> bytes:
    value = 0
    for k in ones:
        value |= 1 << (BLOCK - 1 - k)
    return value.to_bytes(BLOCK // 8, "big")


def noisy(truth: set, rng, loss=0.02) -> set:
    return {k for k in truth if rng.random() >= loss}


class Draws:
    """A random source that returns the values it is given, then `rest`."""

    def __init__(self, *values, rest=0.99):
        self.values, self.rest = list(values), rest

    def __call__(self):
        return self.values.pop(0) if self.values else self.rest


def opinion(name, address=None, responders=1000, probed=BLOCK):
    return Opinion(name, address or f"addr-{name}", responders, probed)


def agree_all(verifier, task):
    return [True] * len(verifier.blocks[task].opinions)


# -- the score ------------------------------------------------------------------------------------

def test_agreement_score_is_the_smaller_share_confirmed():
    rng = random.Random(12)
    truth = set(rng.sample(range(BLOCK), 20000))
    honest, other = noisy(truth, rng), noisy(truth, rng)
    score = agreement(bitmap(honest), bitmap(other))
    assert 0.97 < score.score < 0.99 and score.agrees
    assert score.shared == len(honest & other) and score.ones == len(honest)
    assert agreement(bitmap(()), bitmap(())) == (1.0, 0, 0, 0)          # two empty blocks agree
    assert agreement(bitmap(honest), bitmap(())).score == 0.0            # all zeros
    ones = agreement(bitmap(honest), bitmap(range(BLOCK)))               # all ones
    assert ones.score == pytest.approx(len(honest) / BLOCK) and not ones.agrees
    half = agreement(bitmap(honest), bitmap(k for k in honest if k % 2))
    assert 0.45 < half.score < 0.55 and not half.agrees


def test_a_handful_of_responders_agree_within_the_slack():
    assert agreement(bitmap({1, 2, 3}), bitmap({1, 2})).agrees            # score 0.67
    assert agreement(bitmap(range(5)), bitmap(range(5, 10))).agrees is False   # 10 apart


# -- adaptive replication -------------------------------------------------------------------------

def test_a_new_contributor_is_checked_until_trusted_then_at_the_fraction():
    verifier = Verifier(0.05, trust_after=3, rng=Draws(0.5, 0.01, 0.5))
    for task in range(3):
        assert verifier.add(task, opinion("new")).block.status == Status.WAITING
        assert verifier.next_check("new", "addr-new") is None           # not their own
        assert verifier.next_check("other", "addr-new") is None         # nor from their address
        assert verifier.next_check("new", "elsewhere") is None          # nor by their name
        assert verifier.next_check("checker", "addr-checker") == task
        outcome = verifier.add(task, opinion("checker"), [True])
        assert outcome.block.status == Status.VERIFIED and not outcome.kept_changed
    assert verifier.standing("new") == trust.Standing(agreed=3)
    statuses = [verifier.add(task, opinion("new")).block.status for task in range(3, 6)]
    assert statuses == [Status.UNVERIFIED, Status.WAITING, Status.UNVERIFIED]   # draws .5 .01 .5
    assert verifier.counts()["unverified"] == 2 and verifier.counts()["verified"] == 3



def test_a_result_several_sweeps_built_is_always_checked():
    """A block filled from holes is checked whoever its sweepers are (`check`, or its parts)."""
    verifier = Verifier(0.05, trust_after=0, rng=Draws(rest=0.5))      # trusted, no random draw
    assert verifier.add(1, opinion("trusted")).block.status == Status.UNVERIFIED
    assert verifier.add(2, opinion("trusted"), check=True).block.status == Status.WAITING
    assert verifier.add(3, built("trusted", "trusted2")).block.status == Status.WAITING


def built(*names, responders=500):
    """A result several sweeps built: a part a name, the block shared evenly between them."""
    parts = tuple(opinion(name, responders=responders, probed=BLOCK // len(names)) for name in names)
    last = parts[-1]
    return Opinion(last.contributor, last.address, responders * len(names), BLOCK, parts=parts)


def test_no_sweeper_of_a_result_several_built_is_handed_its_check():
    verifier = Verifier(0.05)
    verifier.add(5, built("a", "b"))
    for name in "ab":
        assert verifier.next_check(name, "elsewhere") is None            # by name
        assert verifier.next_check("other", f"addr-{name}") is None      # by address
        assert not verifier.may_check(5, name, "elsewhere")
        assert not verifier.may_check(5, "other", f"addr-{name}")
    assert verifier.next_check("c", "addr-c") == 5 and verifier.may_check(5, "c", "addr-c")


def test_each_sweep_is_credited_and_judged_on_its_own_part():
    """a swept its half honestly, b filled the other half with a lie: the checks confirm a's
    part, not b's; b loses the dispute and its credit, a keeps its agreement and credit."""
    verifier = Verifier(0.05)
    first = verifier.add(5, built("a", "b"))
    assert [o.contributor for o in first.credit] == ["a", "b"]           # each for its own half
    assert [o.probed for o in first.credit] == [BLOCK // 2] * 2
    check = opinion("c")._replace(confirms=(True, False))
    assert verifier.add(5, check, [False]).block.status == Status.DISPUTED
    third = opinion("d")._replace(confirms=(True, False))
    outcome = verifier.add(5, third, [False, True])
    assert outcome.block.status == Status.VERIFIED and outcome.kept_changed
    assert [o.contributor for o in outcome.debit] == ["b"]
    assert verifier.standing("a") == trust.Standing(agreed=1)
    assert verifier.standing("b") == trust.Standing(disputed=1)
    assert not outcome.block.opinions[0].parts[1].credited and outcome.block.opinions[0].parts[0].credited


def test_a_kept_result_several_built_earns_each_sweep_its_agreement():
    verifier = Verifier(0.05)
    verifier.add(5, built("a", "b", responders=10))                   # b's part proves nothing
    outcome = verifier.add(5, opinion("c")._replace(confirms=(True, True)), [True])
    assert outcome.block.status == Status.VERIFIED and not outcome.kept_changed
    assert verifier.standing("a").agreed == verifier.standing("b").agreed == 0  # too few
    verifier.add(6, built("a", "b"))
    verifier.add(6, opinion("c")._replace(confirms=(True, True)), [True])
    assert verifier.standing("a").agreed == verifier.standing("b").agreed == 1


def test_a_check_that_rejects_a_part_does_not_agree_with_the_result():
    """Verifier.add alone (no store): a check agreeing with the whole but not with b's part
    does not agree with the result; the block wants another opinion and nobody is judged."""
    verifier = Verifier(0.05)
    verifier.add(5, built("a", "b"))
    outcome = verifier.add(5, opinion("c")._replace(confirms=(True, False)), [True])
    assert outcome.block.status == Status.DISPUTED and outcome.block.agreeing == ()
    assert all(verifier.standing(name) == trust.Standing() for name in "abc")
    assert outcome.debit == () and all(part.credited for part in outcome.block.opinions[0].parts)


def test_a_flagged_sweep_earns_no_credit_until_verified():
    verifier = Verifier(0.05)
    verifier.standings["b"] = trust.Standing(disputed=2, flagged=True)
    first = verifier.add(5, built("a", "b"))
    assert [o.contributor for o in first.credit] == ["a"]
    outcome = verifier.add(5, opinion("c")._replace(confirms=(True, True)), [True])
    assert [o.contributor for o in outcome.credit] == ["c", "b"]      # the checker, then b

def test_fraction_zero_turns_verification_off():
    verifier = Verifier(0.0, rng=Draws(rest=0.0))
    assert verifier.add(1, opinion("a")).block.status == Status.UNVERIFIED
    assert verifier.next_check("b", "addr-b") is None


def test_empty_blocks_earn_no_trust():
    verifier = Verifier(0.05, trust_after=1)
    verifier.add(1, opinion("zeros", responders=0))
    verifier.add(1, opinion("checker", responders=0), [True])
    assert verifier.standing("zeros").agreed == 0
    assert verifier.add(2, opinion("zeros", responders=0)).block.status == Status.WAITING


def test_a_disagreement_goes_to_a_third_holder_and_the_majority_is_kept():
    verifier = Verifier(0.05)
    first = verifier.add(7, opinion("liar"))
    assert first.credit == (first.block.opinions[0],)               # credited while not flagged
    outcome = verifier.add(7, opinion("honest"), [False])
    assert outcome.block.status == Status.DISPUTED
    assert verifier.next_check("honest", "addr-honest") is None
    assert verifier.next_check("third", "addr-third") == 7
    outcome = verifier.add(7, opinion("third"), [False, True])
    block = outcome.block
    assert block.status == Status.VERIFIED and outcome.kept_changed
    assert block.opinions[block.kept].contributor == "third"        # the newest of the pair
    assert [o.contributor for o in outcome.debit] == ["liar"]       # a lost dispute takes it back
    assert verifier.standing("liar") == trust.Standing(disputed=1)
    assert verifier.standing("third").agreed == 1 == verifier.standing("honest").agreed
    assert (verifier.agreements, verifier.disputes) == (2, 1)
    assert verifier.next_check("x", "addr-x") is None


def test_no_two_agreeing_ends_unresolved_for_the_operator():
    verifier = Verifier(0.05)
    verifier.add(3, opinion("p0"))
    for n in range(1, trust.MAX_OPINIONS):
        outcome = verifier.add(3, opinion(f"p{n}"), [False] * n)
    assert outcome.block.status == Status.UNRESOLVED and outcome.block.kept == 0
    assert verifier.next_check("p9", "addr-p9") is None


def test_a_liar_is_flagged_its_unverified_results_requeued_and_credit_withheld():
    verifier = Verifier(0.05, trust_after=2, rng=Draws(rest=0.99))
    for task in (1, 2):                      # earns trust on two blocks ...
        verifier.add(task, opinion("turncoat"))
        verifier.add(task, opinion("h1"), [True])
    assert verifier.add(3, opinion("turncoat")).block.status == Status.UNVERIFIED   # ... kept unchecked
    for task in (4, 5):                      # ... then loses two disputes out of four: flagged
        verifier.add(task, opinion("h3"))
        verifier.add(task, opinion("turncoat"), [False])
        outcome = verifier.add(task, opinion("h2"), [True, False])
        assert outcome.block.opinions[outcome.block.kept].contributor == "h3"
    assert outcome.flagged == ("turncoat",) and outcome.requeued == (3,)
    assert verifier.standing("turncoat").flagged
    assert verifier.blocks[3].status == Status.WAITING and verifier.next_check("h2", "addr-h2") == 3
    assert verifier.next_check("turncoat", "addr-elsewhere") is None     # no checks for them
    new = verifier.add(6, opinion("turncoat"))
    assert new.block.status == Status.WAITING and new.credit == ()     # always checked, no credit
    verified = verifier.add(6, opinion("h2"), [True])
    assert [o.contributor for o in verified.credit] == ["h2", "turncoat"]  # credit once verified


def test_busy_blocks_are_skipped_and_restore_requeues():
    verifier = Verifier(0.05)
    verifier.add(1, opinion("a"))
    verifier.add(2, opinion("a"))
    assert verifier.next_check("b", "addr-b", busy={1}) == 2
    copy = Verifier(0.05)
    for task, block in verifier.blocks.items():
        copy.restore(task, block)
    assert copy.next_check("b", "addr-b") == 1
    copy.forget(1)
    assert copy.next_check("b", "addr-b") == 2 and 1 not in copy.blocks


def test_honest_noise_is_never_flagged_and_liars_always_are():
    """A population of pure-logic holders over 300 blocks: five honest (1.6 to 12 % loss) and
    one liar of each kind; each result is compared with agreement() on real bitmaps."""
    rng = random.Random(5)

    def sparse(ands):                        # random bits, each set with probability 2**-ands
        value = ~0
        for _ in range(ands):
            value &= rng.getrandbits(BLOCK)
        return value & ALL

    density = {t: rng.choice((1, 4, 8)) for t in range(300)}   # 1/2, 1/16, 1/256 answer
    truths = {t: sparse(density[t]) for t in range(300)}
    liars = {"zeros": lambda t: 0, "ones": lambda t: ALL,
             "random": lambda t: sparse(density[t]), "copy": lambda t: truths[(t + 1) % 300],
             "half": lambda t: truths[t] & (ALL >> (BLOCK // 2))}
    honest = {f"h{n}": (lambda ands: lambda t: truths[t] & ~sparse(ands))(3 + n) for n in range(5)}
    people = {**honest, **liars}
    verifier = Verifier(0.05, rng=rng.random)
    seen: dict[int, list] = {}
    names = list(people)
    for turn in range(2000):
        name = names[turn % len(names)]
        task = verifier.next_check(name, name) if turn % 3 else None
        if task is None:
            if len(seen) == 300:
                continue
            task = len(seen)
        result = people[name](task).to_bytes(BLOCK // 8, "big")
        prior = seen.setdefault(task, [])
        verifier.add(task, opinion(name, name, int.from_bytes(result, "big").bit_count()),
                     [agreement(result, other).agrees for other in prior])
        prior.append(result)
    assert not any(verifier.standing(h).flagged for h in honest)
    assert all(verifier.standing(liar).flagged for liar in liars)
    assert len(verifier.blocks) == 300
    for block in verifier.blocks.values():         # every block settled, on an honest result
        assert block.status in (Status.VERIFIED, Status.UNVERIFIED)
        assert block.opinions[block.kept].contributor in honest


ALL = (1 << BLOCK) - 1
