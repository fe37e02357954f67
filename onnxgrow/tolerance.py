"""How close is close enough: one rule per dtype, relative to the output's scale.

An output is preserved when

    max |target - source|  <=  atol + rtol * max |source|

over every input case (max |source| over the finite entries). An absolute bound alone is wrong both
ways: 1e-4 is 300x the float32 rounding of an exact rewrite on logits of 0.5, and less than one
float16 step on logits of 20; relative to the output's scale it means the same on both.

rtol is a few units in the last place of the dtype (eps = 2^-mantissa bits), the drift that reordered
sums leave after a few dozen layers:

    float32   eps 1.2e-7   rtol 1e-5 (about 84 eps)   atol 1e-6
    float16   eps 9.8e-4   rtol 4 eps = 3.9e-3        atol 1e-3
    bfloat16  eps 7.8e-3   rtol 4 eps = 3.1e-2        atol 1e-2

So a one-ulp difference at |x| = 10 passes in every dtype and a ten-ulp one fails. atol covers outputs
that are all near zero. Integer and bool outputs must match exactly. `--tolerance T` replaces the rule
with an absolute bound T (rtol 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    given: bool = False  # set by the user, not by the dtype

    def bound(self, scale: float) -> float:
        """The largest abs difference allowed on an output whose largest |value| is `scale`."""
        return self.atol + self.rtol * scale

    def describe(self) -> str:
        if self.rtol == 0:
            return f"max abs diff <= {short(self.atol)}" + (" (given)" if self.given else "")
        return f"max abs diff <= {short(self.atol)} + {short(self.rtol)} x max|source|"


BY_DTYPE = {
    "float64": Tolerance(1e-6, 1e-5),
    "float32": Tolerance(1e-6, 1e-5),
    "float16": Tolerance(1e-3, 4 * 2.0**-10),
    "bfloat16": Tolerance(1e-2, 4 * 2.0**-7),
}
EXACT = Tolerance(0.0, 0.0)  # ints and bools


def by_dtype(name: str) -> Tolerance:
    return BY_DTYPE.get(name, EXACT)


def looser(a: Tolerance, b: Tolerance) -> bool:
    """Whether `a` allows more than `b` (rtol first: it dominates on any output of real scale)."""
    return (a.rtol, a.atol) > (b.rtol, b.atol)


def loosest(*dtype_names: str) -> tuple[str, Tolerance]:
    """The dtype among `dtype_names` with the loosest rule, and that rule (the lower precision of two
    outputs compared is the one that limits what can agree)."""
    best = None
    for name in dtype_names:
        if best is None or looser(by_dtype(name), by_dtype(best)):
            best = name
    return best, by_dtype(best)


def given(atol: float) -> Tolerance:
    return Tolerance(float(atol), 0.0, given=True)


def short(x: float) -> str:
    """A number the way it is written by hand: 1e-4, 3e-2, 3.9e-3."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
