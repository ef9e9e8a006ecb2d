"""The built-in lab: regions "a" and "b" and a witness on one machine, with real servers.

``Lab(root).up()`` starts a PostgreSQL cluster, a SeaweedFS S3 store and an
etcd member per region plus an etcd witness, all detached, on a port block of
their own (``agent.lab.ports``), and writes each region's ``agent.toml``.
``fault()`` kills, stops, pauses or restarts any of them. A lab in network
namespaces (``Lab(root, network="netns")``, ``agent.lab.network``) runs each
member in a namespace of its own, so ``partition()`` can cut a link between
two members and ``heal()`` restore it.
"""

from agent.lab.lab import Lab
from agent.lab.members import DATA_BUCKET, MEMBERS, REGIONS, VAULT_BUCKET
from agent.lab.processes import LabError
from agent.lab.seaweed import S3Credentials

__all__ = ["DATA_BUCKET", "MEMBERS", "REGIONS", "VAULT_BUCKET", "Lab", "LabError", "S3Credentials"]
