"""Secure aggregation against plaintext, same seeds: round time at 10 and 50 sites on a small model
(the `devices` preset, every site sampled), on `hospitals` when asked, the merged update's error and
the upload bytes.

Seconds per round: the mean of the rounds after the first (round 1 loads the model in every worker).
Relative error: round 1's merged update (checkpoint 1 - checkpoint 0), secure vs plaintext, as a
norm ratio. Upload: masked vectors + the key, share and reveal messages, vs the plaintext deltas.

Last line: secagg_round_ratio_10=<x> secagg_round_ratio_50=<y> secagg_rel_error=<e> upload_ratio=<u>
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedpeft.cli import simulate, simulation_config
from fedpeft.runtime import quiet_libraries

ADAPTER = "adapter_model.safetensors"


def _run(preset: str, overrides: str, out: Path) -> dict:
    metrics = simulate(simulation_config(preset, [overrides], str(out)), overwrite=True)  # scratch folders
    e = [r["elapsed_s"] for r in metrics["rounds"]]
    per = [b - a for a, b in zip(e, e[1:])]
    return {"metrics": metrics, "round_s": statistics.mean(per[1:]) if len(per) > 1 else per[0], "out": out}


def _update(out: Path, rnd: int = 1) -> dict[str, torch.Tensor]:
    a = load_file(str(out / "checkpoints" / f"round-{rnd - 1:03d}" / ADAPTER))
    b = load_file(str(out / "checkpoints" / f"round-{rnd:03d}" / ADAPTER))
    return {k: b[k].double() - a[k].double() for k in a}


def _upload(res: dict, secure: bool) -> int:
    total = sum(int(r.get("bytes_up") or 0) for r in res["metrics"]["rounds"][1:])
    if secure:
        for f in sorted((res["out"] / "secagg").glob("round-*/round.json")):
            total += int(json.loads(f.read_text()).get("stage_bytes_up", 0))
    return total


def compare(preset: str, extra: str, out: Path) -> dict[str, float]:
    base = f"dp-noise='seeded' {extra}"
    plain = _run(preset, base, out / "plain")
    secure = _run(preset, base + " secure-aggregation=true", out / "secure")
    up, us = _update(plain["out"]), _update(secure["out"])
    num = sum(((us[k] - up[k]) ** 2).sum().item() for k in up) ** 0.5
    den = sum((up[k] ** 2).sum().item() for k in up) ** 0.5
    return {"ratio": secure["round_s"] / plain["round_s"], "plain_s": plain["round_s"], "secure_s": secure["round_s"],
            "rel_error": num / den, "upload_ratio": _upload(secure, True) / _upload(plain, False),
            "acc_plain": plain["metrics"]["rounds"][-1]["global"]["accuracy"],
            "acc_secure": secure["metrics"]["rounds"][-1]["global"]["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", default="10,50")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hospitals", action="store_true", help="also compare on the hospitals preset")
    ap.add_argument("--ddp", action="store_true",
                    help="also distributed DP (secure + client-dp) against central client-level DP, same noise multiplier")
    ap.add_argument("--out", default="runs/bench-secagg")
    args = ap.parse_args()
    quiet_libraries()
    out = Path(args.out)
    results = {}
    for n in [int(x) for x in args.sites.split(",")]:
        r = compare("devices", f"num-sites={n} sites-per-round={n} num-server-rounds={args.rounds}", out / f"n{n}")
        results[n] = r
        print(f"sites={n} plain_round_s={r['plain_s']:.2f} secure_round_s={r['secure_s']:.2f} ratio={r['ratio']:.3f} "
              f"rel_error={r['rel_error']:.2e} upload_ratio={r['upload_ratio']:.3f} "
              f"acc plain/secure={r['acc_plain']:.4f}/{r['acc_secure']:.4f}", flush=True)
    if args.hospitals:
        r = compare("hospitals", "", out / "hospitals")
        print(f"hospitals plain_round_s={r['plain_s']:.2f} secure_round_s={r['secure_s']:.2f} ratio={r['ratio']:.3f} "
              f"rel_error={r['rel_error']:.2e} upload_ratio={r['upload_ratio']:.3f} "
              f"acc plain/secure={r['acc_plain']:.4f}/{r['acc_secure']:.4f}", flush=True)
    if args.ddp:
        dp = f"dp-noise='seeded' client-dp=true client-dp-noise-multiplier=0.3 client-dp-clip=0.5 num-sites=10 " \
             f"sites-per-round=10 num-server-rounds={args.rounds}"
        central = _run("devices", dp, out / "ddp-central")
        dist = _run("devices", dp + " secure-aggregation=true", out / "ddp-distributed")
        ec = central["metrics"]["rounds"][-1]["client_epsilon"]
        ed = dist["metrics"]["rounds"][-1]["client_epsilon"]
        ac = central["metrics"]["rounds"][-1]["global"]["accuracy"]
        ad = dist["metrics"]["rounds"][-1]["global"]["accuracy"]
        print(f"client-level DP, 10 sites, z=0.3, C=0.5: central eps={ec:.3f} acc={ac:.4f}; "
              f"distributed (Skellam) eps={ed:.3f} acc={ad:.4f}", flush=True)
    r10, r50 = results.get(10), results.get(50)
    worst = max(r["rel_error"] for r in results.values())
    up = max(r["upload_ratio"] for r in results.values())
    print(f"secagg_round_ratio_10={r10['ratio'] if r10 else float('nan'):.3f} "
          f"secagg_round_ratio_50={r50['ratio'] if r50 else float('nan'):.3f} secagg_rel_error={worst:.2e} "
          f"upload_ratio={up:.3f}")


if __name__ == "__main__":
    main()
