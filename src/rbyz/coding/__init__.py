"""Redundancy and coding defences: DETOX, DRACO's repetition code and Election Coding.

These defences change *what the workers compute* before they change how the results are
aggregated: the same data is given to several workers, so that the master can compare their
answers.

- **Group codes** (:mod:`rbyz.coding.groups`; DETOX, DRACO): ``n`` workers form ``n / r``
  groups of ``r`` consecutive workers computing the same batch (:func:`group_assignment`); a
  majority vote inside each group (:func:`group_vote`) removes every Byzantine vector of a group
  with an honest majority. DRACO (:func:`repetition_code`) averages the group winners; DETOX
  (:func:`detox`) feeds them to a hierarchical robust aggregation
  (:func:`rbyz.aggregators.hierarchical`) that only has to handle the
  ``f_eff = floor(f / ceil(r / 2))`` groups the adversary can still win.
- **Election Coding** (:mod:`rbyz.coding.election`; sign domain): an allocation matrix ``G``
  (``n`` workers x ``k`` data partitions) says which partitions each worker holds
  (:func:`bernoulli_code`, :func:`deterministic_code`, :func:`identity_code`); a worker sends
  the majority of its partitions' gradient signs and the master takes the majority of the
  workers' messages (:func:`election_vote`).
- **Analysis** (:mod:`rbyz.coding.analysis`): :func:`vote_failures` counts exactly (or
  estimates) how often ``b`` Byzantine workers can flip the master's vote;
  :func:`detox_vote_failures` does the same for DETOX's group vote under random placement.

Every rule is a function over stacked updates (worker or partition axis first). Their optax
transforms, which must come first in a chain, are in :mod:`rbyz.transforms`
(``detox_aggregate``, ``repetition_aggregate``, ``election_vote_aggregate``).
"""

from rbyz.coding.analysis import GroupVoteFailures as GroupVoteFailures
from rbyz.coding.analysis import VoteFailures as VoteFailures
from rbyz.coding.analysis import detox_vote_failures as detox_vote_failures
from rbyz.coding.analysis import vote_failures as vote_failures
from rbyz.coding.election import Redundancy as Redundancy
from rbyz.coding.election import bernoulli_code as bernoulli_code
from rbyz.coding.election import deterministic_code as deterministic_code
from rbyz.coding.election import election_vote as election_vote
from rbyz.coding.election import identity_code as identity_code
from rbyz.coding.election import local_majorities as local_majorities
from rbyz.coding.election import redundancy as redundancy
from rbyz.coding.groups import FALLBACKS as FALLBACKS
from rbyz.coding.groups import STAGE2_PRESETS as STAGE2_PRESETS
from rbyz.coding.groups import detox as detox
from rbyz.coding.groups import detox_needs_key as detox_needs_key
from rbyz.coding.groups import effective_byzantine_groups as effective_byzantine_groups
from rbyz.coding.groups import group_assignment as group_assignment
from rbyz.coding.groups import group_vote as group_vote
from rbyz.coding.groups import repetition_code as repetition_code
from rbyz.aggregators.hierarchical import Stage2 as Stage2
from rbyz.aggregators.hierarchical import hierarchical as hierarchical
from rbyz.aggregators.hierarchical import plain as plain

# The transforms live in rbyz.transforms.coding; these names are kept for code written against
# rbyz.coding (imported last: rbyz.transforms.coding needs the modules above).
from rbyz.transforms.coding import detox_aggregate as detox_aggregate  # noqa: E402
from rbyz.transforms.coding import election_vote_aggregate as election_vote_aggregate  # noqa: E402
from rbyz.transforms.coding import repetition_aggregate as repetition_aggregate  # noqa: E402

__all__ = (
    "FALLBACKS",
    "STAGE2_PRESETS",
    "GroupVoteFailures",
    "Redundancy",
    "Stage2",
    "VoteFailures",
    "bernoulli_code",
    "deterministic_code",
    "detox",
    "detox_aggregate",
    "detox_needs_key",
    "detox_vote_failures",
    "effective_byzantine_groups",
    "election_vote",
    "election_vote_aggregate",
    "group_assignment",
    "group_vote",
    "hierarchical",
    "identity_code",
    "local_majorities",
    "plain",
    "redundancy",
    "repetition_aggregate",
    "repetition_code",
    "vote_failures",
)
