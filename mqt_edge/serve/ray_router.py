"""Ray Serve's request router for the model replicas: a conversation goes back to the replica that holds it.

Ray loads this module by name (`RequestRouterConfig(request_router_class=...)`) in the process that
routes: the ingress replica, whose handle calls the model deployment with the routing key as Ray's
`session_id` (see ray.py). Imported only where Ray is installed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

MAX_PINS = 65536  # keys remembered per router: a few MB, far more than live conversations


class Pins:
    """Key -> replica, kept for as long as the replica lives; a new key goes to the replica with fewest keys.

    Consistent hashing alone places few keys unevenly (5 images on 2 replicas land 4:1 or 5:0 in
    three starts of eight), so a first sight is placed by count and only ties go by a per-key hash
    (rendezvous), which keeps the choice the same in every router that sees the keys in the same order.
    """

    def __init__(self, max_keys: int = MAX_PINS) -> None:
        self.max_keys = max_keys
        self._pin: OrderedDict[str, Hashable] = OrderedDict()
        self._count: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._pin)

    def place(self, key: str, live: Sequence[tuple[Hashable, str]]) -> Hashable:
        """The replica for key among live (replica, stable name) pairs, pinning it on first sight."""
        ids = [r for r, _ in live]
        held = self._pin.get(key)
        if held is not None and held in ids:
            self._pin.move_to_end(key)
            return held
        if held is not None:  # its replica is gone: place it again
            self._count[held] -= 1
        order = sorted(live, key=lambda rn: hashlib.blake2b(f"{key}\0{rn[1]}".encode(), digest_size=8).digest())
        chosen = min((r for r, _ in order), key=lambda r: self._count.get(r, 0))  # min keeps the first of ties
        self._pin[key] = chosen
        self._count[chosen] = self._count.get(chosen, 0) + 1
        while len(self._pin) > self.max_keys:
            _, old = self._pin.popitem(last=False)
            self._count[old] -= 1
        return chosen


class AffinityRouter(ConsistentHashRouter):
    """Ray's consistent-hash router with pinned, count-balanced keys and a fallback to the least-loaded other.

    A request with a `session_id` (the x-session-id header, or the key the ingress derived from the
    image) goes to its pinned replica; when that replica's queue is at max_ongoing_requests, Ray's
    probe rejects it and the next rank, every other replica, takes it (the least loaded first).
    Requests without a key (health checks, malformed bodies) are spread by Ray's ring as before.
    """

    def initialize_state(self, max_keys: int = MAX_PINS, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._pins = Pins(max_keys)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key or not candidate_replicas:
            return await super().choose_replicas(candidate_replicas, pending_request)
        pending_request.routing_context.should_backoff = True  # all full: back off rather than spin
        live = [(r.replica_id, r.replica_id.unique_id) for r in candidate_replicas]
        primary = self._pins.place(key, live)
        rest = [r for r in candidate_replicas if r.replica_id != primary]
        ranks = [[r for r in candidate_replicas if r.replica_id == primary]]
        return ranks + [rest] if rest else ranks
