"""Fuzz the service through its own OpenAPI spec with schemathesis: `mml serve` (real uvicorn, its own
process, a random admin token) on a free loopback port, then the schemathesis CLI against
/openapi.json (coverage, fuzzing and stateful phases; valid and invalid inputs).

    python -m reliability.fuzz [--examples 1000] [--seed 1] [--out docs/results/reliability.json]

Two passes:

* `main`: every operation with the valid admin token, so the admin routes are exercised past auth
  (`POST /admin/reload` capped at RELOAD_EXAMPLES examples: a reload of the current bundle takes
  seconds);
* `auth`: the admin operations without a configured token: schemathesis generates the
  `authorization` header itself (random schemes and tokens), which must all be refused with 401.

Checks, on every response: `not_a_server_error` (no 5xx), `status_code_conformance`,
`content_type_conformance`, `response_schema_conformance` (what the spec documents), and
`error_body_names_the_problem` (reliability/fuzz_hooks.py: every 4xx is an ErrorResponse; a refused
input names its field). Not enabled: `positive_data_acceptance` / `negative_data_rejection`: the
service refuses some schema-valid inputs on purpose (an empty `X-MML-Arm`, a `image_base64` that is
not base64) and accepts numbers for ids (documented coercion).

The figures (requests sent, statuses, 5xx, bad 4xx bodies, tracebacks in the server log) are
counted from schemathesis's NDJSON report, every request and response it recorded. Exit status 1
when any check failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from reliability.fuzz_hooks import error_body_problem
from reliability.harness import RESULTS, WORK, Server, test_bundles, update_results

HOOKS = Path(__file__).with_name("fuzz_hooks.py")
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "error_body_names_the_problem",
)
RELOAD_EXAMPLES = 25  # POST /admin/reload: each reload of the current bundle loads it again (~2 s)
ADMIN_PATHS = ("/admin/reload", "/items/{item_id}")


def _config(path: Path, token: str | None, reload_examples: int) -> Path:
    """schemathesis.toml of one pass (0600: it may hold the token, which stays off command lines)."""
    lines = [f'hooks = "{HOOKS}"', "[generation]", 'database = "none"']
    if token is not None:
        lines += ["[headers]", f'Authorization = "Bearer {token}"']
    lines += ["[[operations]]", 'include-path = "/admin/reload"', "[operations.generation]",
              f"max-examples = {reload_examples}"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _interactions(ndjson: Path) -> list[dict]:
    out = []
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        for interaction in finished.get("recorder", {}).get("interactions", {}).values():
            request, response = interaction["request"], interaction.get("response")
            if response is None:
                out.append({"label": f"{request['method']} {request['uri']}", "status": 0, "content": b""})
                continue
            content = response.get("content") or {}
            raw = base64.b64decode(content["$base64"]) if "$base64" in content else b""
            path = "/" + request["uri"].split("/", 3)[3].split("?")[0]
            label = f"{request['method']} {path if not path.startswith('/items/') else '/items/{item_id}'}"
            out.append({"label": label, "status": response["status_code"], "content": raw})
    return out


def _pass(name: str, url: str, workdir: Path, token: str | None, examples: int, seed: int) -> dict:
    config = _config(workdir / f"{name}.toml", token, min(examples, RELOAD_EXAMPLES))
    ndjson = workdir / f"{name}.ndjson"
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    cmd = [binary, "--config-file", str(config), "run", f"{url}/openapi.json",
           "--max-examples", str(examples), "--seed", str(seed), "--checks", ",".join(CHECKS),
           "--continue-on-failure", "--workers", "1", "--request-timeout", "30", "--no-color",
           "--report", "ndjson", "--report-ndjson-path", str(ndjson),
           "--suppress-health-check", "all"]  # fmt: skip
    if token is None:  # the auth pass: admin operations only
        for path in ADMIN_PATHS:
            cmd += ["--include-path", path]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    seconds = time.monotonic() - start
    (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    interactions = _interactions(ndjson) if ndjson.is_file() else []
    statuses = Counter(i["status"] for i in interactions)
    problems = []
    for i in interactions:
        problem = error_body_problem(i["status"], i["content"])
        if problem:
            problems.append(f"{i['label']}: {problem}")
    summary = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("❌")]
    return {
        "exit_code": proc.returncode,
        "seconds": round(seconds, 1),
        "requests": len(interactions),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "no_answer": statuses.get(0, 0),
        "bad_4xx_bodies": len(problems),
        "bad_4xx_examples": problems[:5],
        "by_operation": dict(sorted(Counter(i["label"] for i in interactions).items())),
        "schemathesis_failures": summary,
        "log": str(workdir / f"{name}.log"),
    }


def run(examples: int, seed: int, bundle: Path | None = None) -> dict:
    bundle = bundle or test_bundles()[0]
    workdir = WORK / "fuzz"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    token = secrets.token_urlsafe(24)
    import schemathesis

    with Server(bundle, workdir / "server", token=token, log_level="info") as server:
        main = _pass("main", server.url, workdir, token, examples, seed)
        auth = _pass("auth", server.url, workdir, None, max(10, examples // 4), seed + 1)
        alive = server.process.poll() is None
    log = server.stdout() + server.stderr()
    result = {
        "schemathesis": schemathesis.__version__,
        "examples_per_operation": examples,
        "seed": seed,
        "checks": list(CHECKS),
        "passes": {"main": main, "auth": auth},
        "requests": main["requests"] + auth["requests"],
        "server_errors": main["server_errors"] + auth["server_errors"],
        "bad_4xx_bodies": main["bad_4xx_bodies"] + auth["bad_4xx_bodies"],
        "auth_pass_admin_statuses": auth["statuses"],
        "tracebacks_in_server_log": log.count("Traceback"),
        "token_in_server_log": token in log,
        "server_alive_after": alive,
    }
    result["ok"] = (
        main["exit_code"] == 0
        and auth["exit_code"] == 0
        and result["server_errors"] == 0
        and result["bad_4xx_bodies"] == 0
        and main["no_answer"] + auth["no_answer"] == 0
        and result["tracebacks_in_server_log"] == 0
        and not result["token_in_server_log"]
        and alive
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Fuzz the service's OpenAPI spec with schemathesis.")
    parser.add_argument("--examples", type=int, default=1000, help="max examples per operation and phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--bundle", type=Path, default=None, help="default: the test bundle (built if absent)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON (section 'fuzz')")
    args = parser.parse_args()
    result = run(args.examples, args.seed, args.bundle)
    update_results(args.out, "fuzz", result)
    print(json.dumps({k: v for k, v in result.items() if k != "passes"}, indent=2))
    for name, p in result["passes"].items():
        print(f"{name}: {p['requests']} requests in {p['seconds']} s, statuses {p['statuses']}")
        for line in p["schemathesis_failures"] + p["bad_4xx_examples"]:
            print(f"  {line}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
