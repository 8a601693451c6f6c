"""Write tests/data/load_curve.csv: one day of chat traffic, per minute, with a burst.

    .venv/bin/python tests/data/make_load_curve.py     # rewrites the committed file (seeded: same bytes)

Diurnal: 1.5 requests/s at the 04:00 trough, 20 at the 16:00 peak, shaped as a squared raised
cosine (nights are long and flat, the afternoon peak narrow). Burst: +14 requests/s from 10:30 to
10:45, a sudden step on a ~7 requests/s morning, the case a cold start hurts. Each minute gets
±5 % multiplicative noise from a seeded generator. tests/unit/test_autoscale.py reads the CSV, not
this script.
"""

import math
import random
from pathlib import Path

OUT = Path(__file__).with_name("load_curve.csv")


def rate(t_s: float, rng: random.Random) -> float:
    hour = t_s / 3600
    base = 1.5 + 18.5 * ((1 - math.cos(2 * math.pi * (hour - 4) / 24)) / 2) ** 2
    burst = 14.0 if 10.5 <= hour < 10.75 else 0.0
    return max(0.0, (base + burst) * (1 + 0.05 * rng.gauss(0, 1)))


def main() -> None:
    rng = random.Random(20261128)
    lines = ["t_s,arrival_rps"] + [f"{t},{rate(t, rng):.3f}" for t in range(0, 86_400, 60)]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT} ({len(lines) - 1} rows)")


if __name__ == "__main__":
    main()
