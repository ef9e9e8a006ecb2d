"""``[policy]``: recovery objectives and the compliance policy.

Every duration accepts seconds or ``"30s"``, ``"15m"``, ``"7d"``. The
compliance controls (``agent/compliance``) read nothing else: changing this
section changes what passes.
"""

from __future__ import annotations

from replicators.settings import PositiveDuration, Section

DAY = 86400.0


class PolicyConfig(Section):
    """Recovery objectives and compliance policy, per stream where it matters.

    - ``rpo_seconds`` / ``default_rpo_seconds``: RPO target per stream.
    - ``rto_seconds``: the recovery-time objective a restore drill must meet.
    - ``drill_every``: a successful restore drill is due this often; the
      daemon of a passive region runs one when it is due and ``drill_schedule``
      is on.
    - ``retention``: how long evidence entries are kept (and locked, where
      the vault's bucket has S3 Object Lock).
    - ``encryption_required``: every destination must have a key-encryption key.
    - ``max_key_age``: the current key-encryption key must be younger.
    - ``max_verification_age``: a successful verification (drill or
      ``dragent verify``) must be younger.
    - ``rpo_window``: the period over which recorded RPO samples must stay
      within target for the RPO control to pass.
    - ``rpo_sample_every``: how often the active region records the highest
      RPO it saw into the evidence log.
    - ``evaluate_every``: how often controls are re-evaluated.
    - ``drillable``: this configuration is a lab or staging one; a failover
      drill may run against it.
    - ``require_object_lock``: the evidence control fails unless the vault's
      bucket has Object Lock.
    """

    rpo_seconds: dict[str, PositiveDuration] = {}
    default_rpo_seconds: PositiveDuration = 5.0
    rto_seconds: PositiveDuration = 60.0
    drill_every: PositiveDuration = 7 * DAY
    drill_schedule: bool = True
    retention: PositiveDuration = 400 * DAY
    encryption_required: bool = True
    max_key_age: PositiveDuration = 90 * DAY
    max_verification_age: PositiveDuration = 1 * DAY
    rpo_window: PositiveDuration = 1 * DAY
    rpo_sample_every: PositiveDuration = 60.0
    evaluate_every: PositiveDuration = 30.0
    drillable: bool = False
    require_object_lock: bool = False

    def rpo_target(self, stream: str) -> float:
        return self.rpo_seconds.get(stream, self.default_rpo_seconds)
