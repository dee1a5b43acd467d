"""Locust load test of the recall service: replays the new users of a prepared split.

    MML_ADMIN_TOKEN=... locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 20 -r 5 -t 60s --csv docs/results/loadtest/locust --data-dir artifacts/data/ml-1m

`make loadtest` (`loadtest/run.py`) starts the service and runs exactly that. Before the users start
(`test_start`): GET /v1/models (the arms and their kinds) and PUT /items for a few real movies with
their posters under fresh ids (`loadtest/traffic.py`). Then each simulated user, at a fixed pace
(`--user-rate` task runs per second; locust is closed-loop: a slow answer delays that user's next
request), runs these tasks by weight:

| weight | task | request |
|---|---|---|
| 6 | `recall_history` | POST /recall with a new user's support items as history; 20 % end with a registered new item |
| 3 | `post_event` | POST /events: the next item of the sequence this user is replaying |
| 1 | `recall_stored` | POST /recall without a history: the service reads the events posted so far |

Each answer is checked (status, k items, the arm named in the body and the `X-MML-Arm` header, a
registered new item in the history reported as `warmed_up` by an `mml` arm, no popularity fallback
for a user with stored events, `history_length` = events posted, give or take a retry after an
error); a check that fails is a failed request. The server's own time of each answer (the `app`
entry of the `Server-Timing` header: request reaching the app -> response start) is kept too; its
percentiles go to the summary.

At the end (`quitting`) the rules of `loadtest/thresholds.py` (options `--p99-ms`,
`--max-failure-ratio`, `--min-requests`; every new item registered, every arm with a weight served)
set the process exit code: 0 pass, 1 fail.
`--summary-json FILE` writes the verdict and the figures the report needs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from locust import FastHttpUser, events, task
from locust.clients import HttpSession
from locust.user.wait_time import constant_pacing

try:
    from loadtest.traffic import Traffic, TrafficConfig, load_traffic
except ModuleNotFoundError:  # `locust -f loadtest/locustfile.py` puts only loadtest/ on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loadtest.traffic import Traffic, TrafficConfig, load_traffic
from loadtest.thresholds import EndpointStats, RunFacts, Thresholds, breaches

log = logging.getLogger("loadtest")

ADMIN_TOKEN_ENV = "MML_ADMIN_TOKEN"  # never a command-line option: it would show in the process list


class State:
    """What the tasks share within the locust process, set at `init` and `test_start`."""

    traffic: Traffic | None = None
    arms: dict[str, str] = {}  # arm name -> kind, from GET /v1/models
    arm_weights: dict[str, float] = {}
    registered: list[str] = []  # new items the service accepted
    registration_errors: list[str] = []
    arm_counts: Counter = Counter()  # answered /recall per arm
    server_ms: dict[str, list[float]] = {}  # request name -> Server-Timing `app` of each answer


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("mml-recall load test")
    group.add_argument("--data-dir", default="artifacts/data/ml-1m", env_var="MML_LOADTEST_DATA",
                       help="prepared split whose new users are replayed")  # fmt: skip
    group.add_argument("--new-items", type=int, default=TrafficConfig.model_fields["new_items"].default,
                       help="items registered with PUT /items before the load starts")  # fmt: skip
    group.add_argument("--new-item-share", type=float,
                       default=TrafficConfig.model_fields["new_item_share"].default,
                       help="share of history /recall requests that end with a registered new item")  # fmt: skip
    group.add_argument("--user-rate", type=float, default=5.0, help="task runs per second per simulated user")
    group.add_argument("--p99-ms", type=float, default=Thresholds.model_fields["recall_p99_ms"].default,
                       help="fail when a /recall endpoint's client-side p99 is above this")  # fmt: skip
    group.add_argument("--max-failure-ratio", type=float,
                       default=Thresholds.model_fields["max_failure_ratio"].default,
                       help="fail when failed / all requests is above this")  # fmt: skip
    group.add_argument("--min-requests", type=int, default=Thresholds.model_fields["min_requests"].default,
                       help="fail when fewer requests were made")  # fmt: skip
    group.add_argument("--summary-json", default="", help="write the verdict and figures to this file")


@events.init.add_listener
def _load(environment, **_) -> None:
    options = environment.parsed_options
    if options is None:  # imported by a tool, not started by locust
        return
    if options.user_rate <= 0:
        raise SystemExit(f"--user-rate must be > 0, got {options.user_rate}")
    State.traffic = load_traffic(
        TrafficConfig(
            data_dir=Path(options.data_dir),
            new_items=options.new_items,
            new_item_share=options.new_item_share,
        )
    )
    log.info(
        "traffic: %d sequences, %d new items to register",
        len(State.traffic.sequences),
        len(State.traffic.new_items),
    )


@events.test_start.add_listener
def _setup(environment, **_) -> None:
    """The arms, then the new items (PUT /items with the admin token), recorded in the stats."""
    session = HttpSession(base_url=environment.host, request_event=environment.events.request, user=None)
    with session.get("/v1/models", name="/v1/models", catch_response=True) as r:
        if r.status_code == 200:
            State.arms = {a["name"]: a["kind"] for a in r.json()["arms"]}
            State.arm_weights = {a["name"]: a["weight"] for a in r.json()["arms"]}
        else:
            r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    headers = {"Authorization": f"Bearer {token}"}
    for item in State.traffic.new_items if State.traffic else []:
        with session.put(
            f"/items/{item.item_id}", json=item.body, headers=headers, name="/items/[id]", catch_response=True
        ) as r:
            if r.status_code in (200, 201):
                State.registered.append(item.item_id)
            else:
                message = f"PUT /items/{item.item_id}: HTTP {r.status_code}: {r.text[:200]}"
                State.registration_errors.append(message)
                r.failure(message)
    log.info("registered %d new items: %s", len(State.registered), State.registered)


def _server_ms(header: str | None) -> float | None:
    """The `app` duration of a Server-Timing header (`model;dur=0.9, app;dur=1.7`), in ms."""
    for entry in (header or "").split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if name == "app" and duration:
            return float(duration)
    return None


class RecallUser(FastHttpUser):
    def wait_time(self) -> float:
        return constant_pacing(1.0 / self.environment.parsed_options.user_rate)(self)

    def on_start(self) -> None:
        self.rng = random.Random()
        self._next_replay()

    def _next_replay(self) -> None:
        self.replay = self.rng.choice(State.traffic.sequences)
        self.live_user = Traffic.live_user_id(self.replay, f"{id(self):x}-{self.rng.getrandbits(32):08x}")
        self.cursor = 0  # events of the replay stored so far
        self.unconfirmed = 0  # events answered with an error: stored or not, the client cannot tell

    def _recall(self, body: dict, name: str, new_item: str | None, stored_events: int = 0) -> None:
        """POST /recall and check the answer; `stored_events`: events this user posted (stored history)."""
        with self.client.post("/recall", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            answer = r.json()
            arm = answer["arm"]
            if r.headers.get("X-MML-Arm") != arm:
                r.failure(f"X-MML-Arm {r.headers.get('X-MML-Arm')!r} != arm {arm!r} of the body")
            elif State.arms and arm not in State.arms:
                r.failure(f"arm {arm!r} is not one of {sorted(State.arms)}")
            elif len(answer["items"]) != body["k"]:
                r.failure(f"{len(answer['items'])} items, asked for k = {body['k']}")
            elif (
                new_item
                and State.arms.get(arm) == "mml"
                and not answer["degraded"]
                and new_item not in answer["warmed_up"]
            ):
                r.failure(f"registered new item {new_item} in the history was not warmed up")
            elif (
                stored_events
                and State.arms.get(arm) == "mml"
                and not answer["degraded"]
                and answer["fallback"]
            ):
                r.failure(f"popularity fallback although {stored_events} events are stored")
            State.arm_counts[arm] += 1
            server_ms = _server_ms(r.headers.get("Server-Timing"))
            if server_ms is not None:
                State.server_ms.setdefault(name, []).append(server_ms)

    @task(6)
    def recall_history(self) -> None:
        body, new_item = State.traffic.recall_with_history(self.rng)
        if new_item is not None and new_item not in State.registered:
            body["history"].pop()  # its registration failed (already counted): ask without it
            new_item = None
        self._recall(body, "/recall [history]", new_item)

    @task(3)
    def post_event(self) -> None:
        if self.cursor == len(self.replay.items):
            self._next_replay()
        body = Traffic.event(self.live_user, self.replay.items[self.cursor], int(time.time()))
        with self.client.post("/events", json=body, name="/events", catch_response=True) as r:
            if r.status_code != 202:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                self.unconfirmed += 1  # maybe stored before the error: the retry may store it twice
                return  # the replay posts this item again
            length, posted = r.json()["history_length"], self.cursor + 1
            if not posted <= length <= posted + self.unconfirmed:
                r.failure(f"history_length {length} after {posted} events ({self.unconfirmed} unconfirmed)")
        self.cursor += 1

    @task(1)
    def recall_stored(self) -> None:
        self._recall(State.traffic.recall_stored(self.live_user), "/recall [stored]", None, self.cursor)


def _endpoint(method: str, name: str, entry) -> EndpointStats:
    def pct(q: float) -> float:
        return float(entry.get_response_time_percentile(q)) if entry.num_requests else 0.0

    return EndpointStats(
        method=method,
        name=name,
        requests=entry.num_requests,
        failures=entry.num_failures,
        p99_ms=pct(0.99),
        p50_ms=pct(0.5),
        p95_ms=pct(0.95),
        max_ms=float(entry.max_response_time or 0.0),
        rps=float(entry.total_rps),
    )


def endpoint_stats(stats) -> list[EndpointStats]:
    """locust's RequestStats -> one entry per (method, name), for the thresholds and the report."""
    return [_endpoint(method, name, entry) for (name, method), entry in sorted(stats.entries.items())]


def server_percentiles(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Exact percentiles of the Server-Timing samples (locust's own buckets round to whole ms)."""
    return {
        name: {
            "requests": len(values),
            **{f"p{q}_ms": round(float(np.percentile(values, q)), 3) for q in (50, 95, 99)},
        }
        for name, values in sorted(samples.items())
        if values
    }


@events.quitting.add_listener
def _verdict(environment, **_) -> None:
    options = environment.parsed_options
    thresholds = Thresholds(
        recall_p99_ms=options.p99_ms,
        max_failure_ratio=options.max_failure_ratio,
        min_requests=options.min_requests,
    )
    client = endpoint_stats(environment.stats)
    facts = RunFacts(
        endpoints=client,
        arm_weights=State.arm_weights,
        arm_counts=dict(State.arm_counts),
        new_items_expected=len(State.traffic.new_items) if State.traffic else 0,
        new_items_registered=len(State.registered),
    )
    broken = breaches(facts, thresholds) + State.registration_errors
    environment.process_exit_code = 1 if broken else 0
    for line in broken:
        log.error("threshold breached: %s", line)
    log.info("load test %s", "FAILED" if broken else "passed")
    if options.summary_json:
        summary = {
            "passed": not broken,
            "breaches": broken,
            "thresholds": thresholds.model_dump(),
            "arms": State.arms,
            "arm_weights": State.arm_weights,
            "arm_counts": dict(State.arm_counts),
            "registered_items": State.registered,
            "server_timing": server_percentiles(State.server_ms),
            "endpoints": [e.__dict__ for e in client],
            "total": _endpoint("", "Aggregated", environment.stats.total).__dict__,
            "user_rate": options.user_rate,
            "users": options.num_users,
            "run_time": options.run_time,
        }
        Path(options.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
