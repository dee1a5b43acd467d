"""Supply-chain and secrets audit.

    python -m reliability.audit [--skip-deps] [--skip-bundle] [--with-encoders] [--out docs/results/reliability.json]

* dependencies: pip-audit (installed into its own venv, AUDIT_VENV, so it does not join the
  project's environment) over every package installed in this interpreter's environment
  (`pip list --format=freeze`), `--no-deps --disable-pip`: nothing is installed, each name==version
  is looked up in PyPI's vulnerability data. Status `ok` (every package audited, no advisory),
  `vulnerable` (advisories listed), or `unavailable` (the advisory service could not be reached or
  knew none of the packages: on a machine whose only PyPI access is a mirror of the packages,
  the advisories are not served; nothing was audited, and the exit status says so).
* bundle secrets: a bundle exported (a small synthetic model, `training.synthetic`) in a child
  process whose environment holds canary secrets (MML_ADMIN_TOKEN, REDIS_URL with a password,
  AWS_SECRET_ACCESS_KEY); every byte of every file of the bundle is searched for each canary value
  and each variable's name. `--with-encoders` adds the ML-1M encoders (test data) to the export.

Exit status: 0 when every part that ran is clean, 1 when a vulnerability or a secret was found,
3 when the dependency audit could not run (unavailable).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from reliability.harness import DATA, RESULTS, WORK, update_results

AUDIT_VENV = Path(__file__).resolve().parents[1] / ".cache" / "audit-venv"
PIP_AUDIT = "pip-audit>=2.7"


def _pip_audit_binary() -> Path:
    binary = AUDIT_VENV / "bin" / "pip-audit"
    if not binary.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(AUDIT_VENV)], check=True)
        subprocess.run([str(AUDIT_VENV / "bin" / "pip"), "install", "-q", PIP_AUDIT], check=True)
    return binary


def audit_dependencies(workdir: Path) -> dict:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requirements = workdir / "requirements.txt"
    requirements.write_text(frozen)
    report = workdir / "pip-audit.json"
    proc = subprocess.run(
        [
            str(_pip_audit_binary()),
            "-r",
            str(requirements),
            "--no-deps",
            "--disable-pip",
            "--progress-spinner",
            "off",
            "-f",
            "json",
            "-o",
            str(report),
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    if not report.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "unavailable", "reason": tail[0][:300], "packages": len(frozen.splitlines())}
    deps = json.loads(report.read_text())["dependencies"]
    skipped = [d for d in deps if d.get("skip_reason")]
    vulns = [
        {"name": d["name"], "version": d["version"], "ids": [v["id"] for v in d["vulns"]]}
        for d in deps
        if d.get("vulns")
    ]
    audited = len(deps) - len(skipped)
    status = "vulnerable" if vulns else ("unavailable" if audited == 0 else "ok")
    return {
        "status": status,
        "packages": len(deps),
        "audited": audited,
        "skipped": len(skipped),
        "skip_reason_example": skipped[0]["skip_reason"] if skipped else None,
        "vulnerabilities": vulns,
    }


EXPORT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from model.config import ModelConfig
    from model.mml import MML
    from training.export import export_model
    from training.export.tables import popularity_counts
    from training.synthetic import synthetic

    out, encoders = Path(sys.argv[1]), (Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    text_dim, image_dim = (384, 1280) if encoders else (12, 20)
    cfg = ModelConfig(d=8, n_heads=2, d_ffn=16, max_len=10, text_dim=text_dim, image_dim=image_dim,
                      n_neighbours=3, feature_sim_dim=4, fusion_hidden=8)
    split, features = synthetic(n_items=40, n_old_items=32, text_dim=text_dim, image_dim=image_dim,
                                n_old_users=10, seed=0)
    model = MML(cfg, split.n_old_items, features.text, features.image, features.image_mask)
    export_model(model, out, item_ids=features.item_id,
                 popularity=popularity_counts(split.old_seqs, split.n_items),
                 encoders_dir=encoders, dataset={"name": "synthetic"}, overwrite=True)
    """
)


def audit_bundle_secrets(workdir: Path, with_encoders: bool) -> dict:
    canaries = {
        "MML_ADMIN_TOKEN": f"canary-token-{secrets.token_hex(8)}",
        "REDIS_URL": f"redis://:canary-password-{secrets.token_hex(8)}@127.0.0.1:6379/0",
        "AWS_SECRET_ACCESS_KEY": f"canary-aws-{secrets.token_hex(12)}",
    }
    out = workdir / "canary-bundle"
    shutil.rmtree(out, ignore_errors=True)
    with_encoders = with_encoders and (DATA / "encoders").is_dir()  # absent: the test data is not built
    args = [sys.executable, "-c", EXPORT, str(out)]
    if with_encoders:
        args.append(str(DATA / "encoders"))
    env = {**os.environ, **canaries}
    subprocess.run(args, env=env, check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True)
    needles = {f"value of {k}": v.encode() for k, v in canaries.items()}
    needles.update({f"name {k}": k.encode() for k in canaries})
    hits, files, size = [], 0, 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files += 1
        size += len(data)
        for what, needle in needles.items():
            if needle in data:
                hits.append(f"{path.relative_to(out)}: {what}")
    return {
        "files": files,
        "bytes": size,
        "with_encoders": with_encoders,
        "canaries": sorted(canaries),
        "hits": hits,
        "status": "ok" if not hits else "secret_found",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="pip-audit of the environment; secrets in a fresh bundle.")
    parser.add_argument("--skip-deps", action="store_true", help="no pip-audit")
    parser.add_argument("--skip-bundle", action="store_true", help="no bundle secrets scan")
    parser.add_argument("--with-encoders", action="store_true", help="export the ML-1M encoders too")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON (section 'audit')")
    args = parser.parse_args()
    workdir = WORK / "audit"
    workdir.mkdir(parents=True, exist_ok=True)
    result = {}
    if not args.skip_deps:
        result["dependencies"] = audit_dependencies(workdir)
    if not args.skip_bundle:
        result["bundle_secrets"] = audit_bundle_secrets(workdir, args.with_encoders)
    update_results(args.out, "audit", result)
    print(json.dumps(result, indent=2))
    statuses = {part["status"] for part in result.values()}
    if statuses & {"vulnerable", "secret_found"}:
        sys.exit(1)
    if "unavailable" in statuses:
        print("pip-audit could not reach a vulnerability service: dependencies NOT audited", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
