#!/usr/bin/env python
"""A processed domain whose validation and test targets are kept for a seeded sample of users only.

    python bench/eval_users.py DOMAIN_DIR --users 500 --seed 0 --out DIR

Every user keeps its training sequence (so every model trains on the same data as with the full
folder); only N randomly chosen users (numpy ``default_rng(seed)``, without replacement) keep
their val and test items, so validation and test rank all items for those N users. The same
folder is given to every model of a comparison, which makes the user sample part of the protocol.
The choice (N, seed, source, chosen user ids) is recorded in DIR/domain.json under "eval_users".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reolm.data.domain import Domain, read_domain, write_domain  # noqa: E402


def sample_eval_users(domain: Domain, users: int, seed: int) -> tuple[Domain, list[int]]:
    """The domain with val/test restricted to ``users`` users drawn with ``seed`` (all of them if fewer)."""
    candidates = sorted(set(domain.val) & set(domain.test))
    rng = np.random.default_rng(seed)
    chosen = sorted(int(u) for u in rng.choice(candidates, size=min(users, len(candidates)), replace=False))
    subset = Domain(name=domain.name, train=domain.train, val={u: domain.val[u] for u in chosen},
                    test={u: domain.test[u] for u in chosen}, smap=domain.smap, umap=domain.umap,
                    meta=domain.meta, attributes=domain.attributes, image_features=domain.image_features,
                    has_image=domain.has_image, extra=dict(domain.extra))
    return subset, chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("domain", metavar="DOMAIN_DIR", help="processed domain folder")
    parser.add_argument("--users", type=int, required=True, help="users whose val/test targets are kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be >= 1")
    domain = read_domain(args.domain)
    subset, chosen = sample_eval_users(domain, args.users, args.seed)
    write_domain(subset, args.out, {"eval_users": {"source": str(Path(args.domain).resolve()), "users": len(chosen),
                                                   "seed": args.seed, "user_ids": chosen}})
    print(f"wrote {args.out}: {len(chosen):,} of {len(domain.val):,} users keep their val/test targets "
          f"(seed {args.seed}); {len(domain.train):,} training sequences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
