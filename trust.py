"""Trust in volunteers' results: when two sweeps of a block agree, and adaptive replication.

Two honest sweeps of one block minutes apart differ (loss, rate limiting, hosts coming and
going), so agreement is a measured score on the two responder sets, not equality: the share of
each side's responders that the other side confirms, the smaller of the two,

    score(A, B) = |A & B| / max(|A|, |B|)          (1.0 when both are empty)

Two results agree when the score is at least AGREE_AT, or when the sets differ by at most SLACK
addresses (a block with a handful of responders, where one lost reply moves the score a lot).
bench/agreement.py measures it on the lab: honest pairs score about 1 - loss, every kind of liar
scores near the block's density or half (see the note of issue 12 for the figures).

Adaptive replication, as BOINC does it, per block:

    first result (kept) ─┬─ its contributor is trusted and not drawn (1 - FRACTION): UNVERIFIED
                         └─ else WAITING: a second holder (other name AND other address) sweeps it
    a pair agrees ──────── VERIFIED: the result kept is one of the pair
    no pair agrees ─────── DISPUTED: one more holder, up to MAX_OPINIONS, then UNRESOLVED

When a block is VERIFIED every opinion in it is judged against the kept one: an agreement (if
the kept result proves something: neither nearly empty nor nearly full) or a dispute for its
contributor. A result several sweeps built (holes left by one, swept by others) is one opinion
with a part a sweep: each part's contributor and address count as having seen the block (none
of them is handed its check), and each part is credited and judged on the addresses it probed.

A contributor is trusted after TRUST_AFTER agreements; until then each of their results is
checked, after it a random FRACTION (0 turns verification off). One who loses
DISPUTE_LIMIT disputes, and more than DISPUTE_SHARE of the judged ones, is flagged: each new
result of theirs is checked, each kept one not yet verified is queued for a check again, they
are given no checks to do, and they earn credit only for results verified (`Outcome.credit` and
`Outcome.debit` say whose credit changes: a lost dispute takes back what was given).

Pure logic: no I/O, no clock, the random source injected. The store persists `Block` and
`Standing` records (tuples of plain values) and compares bitmaps with `agreement()`.
"""
import itertools
import random
from enum import IntEnum
from typing import NamedTuple, Sequence

AGREE_AT = 0.8          # honest pairs score 1 - loss: this allows 20 % of one side unconfirmed
SLACK = 8               # sets that differ by at most this many addresses agree whatever the score
TRUST_AFTER = 10        # agreements before a contributor is checked only at random
FRACTION = 0.05         # share of a trusted contributor's results checked
DISPUTE_LIMIT = 2       # lost disputes before a contributor can be flagged ...
DISPUTE_SHARE = 0.1     # ... and the share of their judged results these must exceed
MAX_OPINIONS = 8        # results of one block before it is left to the operator
SCAN = 256              # queued blocks a hand-out looks at before giving a fresh one instead
TELLING = 16            # an agreement proves something if the kept result has this many
                        # responders and this many silent addresses


class Status(IntEnum):
    UNVERIFIED = 0      # kept without a check (trusted contributor, not drawn)
    WAITING = 1         # kept, a check wanted
    VERIFIED = 2        # two holders agree
    DISPUTED = 3        # no two agree yet: another opinion wanted
    UNRESOLVED = 4      # MAX_OPINIONS and no two agree


class Agreement(NamedTuple):
    score: float
    shared: int          # responders in both
    ones: int            # responders of the first
    other_ones: int      # responders of the second

    @property
    def agrees(self) -> bool:
        return self.score >= AGREE_AT or self.ones + self.other_ones - 2 * self.shared <= SLACK


class Opinion(NamedTuple):
    """One holder's result for a block. `ref` is the store's handle on its bytes.

    A result several sweeps built (a first one with holes, the holes swept by others) has one
    of `parts` per sweep: an Opinion of that sweep's contributor and address, its responders
    and addresses probed, `ref` the spans it probed. Each part is credited, judged and kept
    from checking the block on its own; the opinion's contributor and address are the last
    sweep's, its figures the whole block's. Only a block's first opinion has parts (later
    ones are checks); `confirms`, of a later one: does it agree with each part on the
    addresses that part probed."""
    contributor: str
    address: str
    responders: int
    probed: int
    credited: bool = False
    ref: object = None
    parts: tuple = ()
    confirms: tuple = ()

    @property
    def sweeps(self) -> tuple:
        """The opinions of the sweeps this result is made of: its parts, or itself."""
        return self.parts or (self,)


class Block(NamedTuple):
    opinions: tuple = ()
    agreeing: tuple = ()     # pairs (i, j), i < j, of opinions that agree
    kept: int = 0            # index of the kept opinion
    status: Status = Status.UNVERIFIED

    @property
    def wants_opinion(self) -> bool:
        return self.status in (Status.WAITING, Status.DISPUTED)

    def has_seen(self, name: str, address: str) -> bool:
        """Did this name or this address give an opinion here already (or sweep part of one)?"""
        return any(s.contributor == name or s.address == address
                   for o in self.opinions for s in o.sweeps)


class Standing(NamedTuple):
    agreed: int = 0
    disputed: int = 0
    flagged: bool = False


class Outcome(NamedTuple):
    block: Block
    kept_changed: bool       # the kept opinion is another one than before
    credit: tuple = ()       # opinions whose contributor earns credit now
    debit: tuple = ()        # opinions whose credit is taken back (a lost dispute)
    flagged: tuple = ()      # contributors flagged now
    requeued: tuple = ()     # tasks queued for a check again because of them


def agreement(bitmap: bytes, other: bytes, mask: int | None = None) -> Agreement:
    """The score of two results given as bitmaps of one length (one bit per address); with
    `mask` (an int of that many bits), on the addresses whose bit is set in it alone."""
    a, b = int.from_bytes(bitmap, "big"), int.from_bytes(other, "big")
    if mask is not None:
        a, b = a & mask, b & mask
    ones, other_ones, shared = a.bit_count(), b.bit_count(), (a & b).bit_count()
    most = max(ones, other_ones)
    return Agreement(shared / most if most else 1.0, shared, ones, other_ones)


class Verifier:
    """The trust rule over every block and contributor; one lock outside (the store's)."""

    def __init__(self, fraction: float = FRACTION, *, trust_after: int = TRUST_AFTER,
                 rng=random.random):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("the verified fraction is in [0, 1]")
        self.fraction, self.trust_after, self.rng = fraction, trust_after, rng
        self.blocks: dict[int, Block] = {}
        self.standings: dict[str, Standing] = {}
        # tasks wanting an opinion, oldest first: disputes before first checks, since settling
        # one is what flags a liar and puts an honest result in its place
        self._queues = {Status.DISPUTED: {}, Status.WAITING: {}}
        self._keys: dict[int, frozenset] = {}   # queued task -> its opinions' names, addresses
        # queued task -> the names, addresses that sent its check back unswept in part (in
        # memory only: after a restart they may be handed it once more)
        self._declined: dict[int, frozenset] = {}
        self._seen: dict[tuple, int] = {}       # name or address -> queued tasks it has seen
        self.agreements = self.disputes = 0    # judged opinions, for /metrics

    def add(self, task: int, opinion: Opinion, agrees: Sequence[bool] = (), *,
            check=False) -> Outcome:
        """A new result for `task`; `agrees[i]`: does it agree with opinion i of the block
        (none for a first result, or when the block wants no more opinions: it starts over);
        with the first opinion's parts, it agrees only if it `confirms` each of them too.
        `check`: a first result is checked whatever its contributor's standing, as is one
        with `parts` (several sweeps built it)."""
        old = self.blocks.get(task)
        if old is None or not old.wants_opinion:
            return self._first(task, opinion, check)
        if len(agrees) != len(old.opinions):
            raise ValueError(f"one agreement per earlier opinion ({len(old.opinions)})")
        if old.opinions[0].parts and opinion.confirms:     # a part it rejects: no agreement
            agrees = [agrees[0] and all(opinion.confirms), *agrees[1:]]
        opinion, credit = self._credit_now(opinion)
        n = len(old.opinions)
        block = old._replace(opinions=old.opinions + (opinion,),
                             agreeing=old.agreeing + tuple((i, n) for i, yes in enumerate(agrees) if yes))
        outcome = self._decide(task, block, old.kept)
        return outcome._replace(credit=credit + outcome.credit)

    def next_check(self, name: str, address: str, busy=frozenset(), wanted=None) -> int | None:
        """The oldest disputed block, else the oldest waiting one, that this holder may give an
        opinion on (none of its opinions by this name or address), not `busy` (leased) and
        `wanted(task)` if given; None if none. Only the SCAN oldest are looked at, so a hand-out
        stays cheap when most of the queue is this holder's own results."""
        if not self.fraction or self.standing(name).flagged:
            return None
        keys = _keys_of(name, address)
        if max(self._seen.get(key, 0) for key in keys) >= len(self._keys):
            return None                         # all of them are its own: no need to look
        for task in itertools.islice(itertools.chain(*self._queues.values()), SCAN):
            if (task not in busy and keys.isdisjoint(self._keys.get(task, ()))
                    and keys.isdisjoint(self._declined.get(task, ()))
                    and (wanted is None or wanted(task))):
                return task
        return None

    def decline(self, task: int, name: str, address: str) -> None:
        """This holder sent the block's check back unswept in part: next_check() does not hand
        it this block again while the block waits for the same opinion."""
        self._declined[task] = self._declined.get(task, frozenset()) | _keys_of(name, address)

    def may_check(self, task: int, name: str, address: str) -> bool:
        block = self.blocks.get(task)
        return (block is not None and block.wants_opinion and not block.has_seen(name, address)
                and not self.standing(name).flagged)

    def standing(self, name: str) -> Standing:
        return self.standings.get(name, _NOBODY)

    def forget(self, task: int) -> None:
        """The block's result was discarded (an operator's revise): its opinions go too."""
        self.blocks.pop(task, None)
        self._enqueue(task, Block())

    def restore(self, task: int, block: Block | None) -> None:
        """Put back a block's record as the store persisted it."""
        if block is None:
            return self.forget(task)
        self.blocks[task] = block
        self._enqueue(task, block)

    def counts(self) -> dict:
        """Blocks by status name."""
        tally = dict.fromkeys((s.name.lower() for s in Status), 0)
        for block in self.blocks.values():
            tally[block.status.name.lower()] += 1
        return tally

    # -- private -----------------------------------------------------------------------------

    def _first(self, task: int, opinion: Opinion, check=False) -> Outcome:
        opinion, credit = self._credit_now(opinion)
        standing = self.standing(opinion.contributor)
        checked = self.fraction > 0 and (check or bool(opinion.parts) or standing.flagged
                                         or standing.agreed < self.trust_after
                                         or self.rng() < self.fraction)
        block = Block((opinion,), (), 0, Status.WAITING if checked else Status.UNVERIFIED)
        self._declined.pop(task, None)           # a new result: anyone may check it
        self.restore(task, block)
        return Outcome(block, False, credit)

    def _credit_now(self, opinion: Opinion) -> tuple[Opinion, tuple]:
        """A contributor who is not flagged earns credit at once; each sweep of a result
        several built, for its own part (the opinion itself is then never credited)."""
        if opinion.parts:
            parts = [self._credit_now(part) for part in opinion.parts]
            return (opinion._replace(parts=tuple(part for part, _ in parts)),
                    tuple(credit for _, credits in parts for credit in credits))
        if self.standing(opinion.contributor).flagged:
            return opinion._replace(credited=False), ()
        opinion = opinion._replace(credited=True)
        return opinion, (opinion,)

    def _decide(self, task: int, block: Block, kept_before: int) -> Outcome:
        partners = [0] * len(block.opinions)
        for i, j in block.agreeing:
            partners[i] += 1
            partners[j] += 1
        if not any(partners):
            status = Status.UNRESOLVED if len(block.opinions) >= MAX_OPINIONS else Status.DISPUTED
            block = block._replace(status=status)
            self.restore(task, block)
            return Outcome(block, False)
        # the kept result stays if it is among the best; else the newest of them, whose bytes
        # the store has in hand (it keeps only the bitmaps of the others, for comparing)
        best = max(partners)
        newest = len(partners) - 1
        kept = (kept_before if partners[kept_before] == best
                else newest if partners[newest] == best else partners.index(best))
        block = block._replace(kept=kept, status=Status.VERIFIED)
        block, credit, debit, flagged = self._judge(block)
        self.restore(task, block)
        requeued = tuple(t for name in flagged for t in self._requeue(name))
        return Outcome(block, kept != kept_before, credit, debit, flagged, requeued)

    def _judge(self, block: Block):
        """Each opinion against the kept one: an agreement or a dispute for its contributor;
        each part of one several sweeps built on its own addresses (the kept opinion's
        `confirms`; a kept one with parts agreed with its partner on every part)."""
        kept = block.opinions[block.kept]
        opinions, out = [], ([], [], [])            # credit, debit, flagged
        for i, opinion in enumerate(block.opinions):
            agrees = i == block.kept or (min(i, block.kept), max(i, block.kept)) in block.agreeing
            if not opinion.parts:
                opinions.append(self._judge_one(opinion, agrees, _telling(kept), out))
                continue
            # each part as the kept opinion confirms it; the kept one itself agreed with its
            # partner on every part (add asks a check to confirm each)
            confirms = kept.confirms if i != block.kept else ()
            if len(confirms) != len(opinion.parts):
                confirms = (agrees,) * len(opinion.parts)
            opinions.append(opinion._replace(parts=tuple(
                self._judge_one(part, yes, min(_telling(kept), _telling(part)), out)
                for part, yes in zip(opinion.parts, confirms))))
        return (block._replace(opinions=tuple(opinions)), *map(tuple, out))

    def _judge_one(self, opinion: Opinion, agrees: bool, telling: int, out) -> Opinion:
        """An agreement or a dispute for one sweep's contributor, its credit given or taken
        back (appended to `out`: credit, debit, flagged); the opinion as judged."""
        credit, debit, flagged = out
        standing = self.standing(opinion.contributor)
        if agrees:
            self.agreements += 1
            standing = standing._replace(agreed=standing.agreed + telling)
            if not opinion.credited:
                opinion = opinion._replace(credited=True)
                credit.append(opinion)
        else:
            self.disputes += 1
            standing = standing._replace(disputed=standing.disputed + 1)
            if opinion.credited:
                debit.append(opinion)
                opinion = opinion._replace(credited=False)
        if not standing.flagged and _too_many_disputes(standing):
            standing = standing._replace(flagged=True)
            flagged.append(opinion.contributor)
        self.standings[opinion.contributor] = standing
        return opinion

    def _requeue(self, name: str) -> list:
        """Queue for a check every block whose kept result, by `name`, was never verified."""
        again = [task for task, block in self.blocks.items()
                 if block.status == Status.UNVERIFIED
                 and any(s.contributor == name for s in block.opinions[block.kept].sweeps)]
        for task in again:
            self.restore(task, self.blocks[task]._replace(status=Status.WAITING))
        return again

    def _enqueue(self, task: int, block: Block) -> None:
        for status, queue in self._queues.items():
            if block.status == status:
                queue.setdefault(task, None)
            else:
                queue.pop(task, None)
        keys = frozenset().union(*(_keys_of(s.contributor, s.address)
                                   for o in block.opinions for s in o.sweeps)
                             ) if block.wants_opinion else frozenset()
        old = self._keys.pop(task, frozenset())
        for key in old - keys:
            self._seen[key] -= 1
            if not self._seen[key]:
                del self._seen[key]
        for key in keys - old:
            self._seen[key] = self._seen.get(key, 0) + 1
        if keys:
            self._keys[task] = keys
        else:
            self._declined.pop(task, None)       # no check wanted any more


_NOBODY = Standing()


def _keys_of(name: str, address: str) -> frozenset:
    """How the queues know a holder: by name and by address, either one enough."""
    return frozenset({("name", name), ("address", address)})


def _telling(opinion: Opinion) -> int:
    """1 if agreeing with this result proves something (it is neither nearly empty nor full)."""
    return int(opinion.responders >= TELLING and opinion.probed - opinion.responders >= TELLING)


def _too_many_disputes(standing: Standing) -> bool:
    judged = standing.agreed + standing.disputed
    return standing.disputed >= DISPUTE_LIMIT and standing.disputed > DISPUTE_SHARE * judged
