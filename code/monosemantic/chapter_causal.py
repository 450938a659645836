"""The book's readings of ``analysis/<profile>-causal`` (chapter 3's causal test and the preface): the cells of
the design, the rank tests against random and decoder directions, the fitted controls and the family-level
tests, each with Holm's adjustment where the chapter reads several together. Re-exported by
:mod:`monosemantic.chapter`, where the chapters find them."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

LEADER_MEASURES = ("family", "predicted", "own")
"""The token sets a causal edit is ranked on among random directions (the change in log-odds of their
next-token probability): the family's tokens; the tokens that follow the feature's firings on the other half
of the held-out documents; each direction's own promoted tokens. The KL says only that an edit moves the
distribution and is not tested."""


def causal_main(table, config: dict | None = None):
    """The main cells of a causal table (``causal.parquet``, ``random_directions.parquet``, ``sampling.parquet``):
    the clamp at ``clamp_multiple`` on all positions, the ablation at firing positions with the true LayerNorm
    scale, and the clamp protocol's sampled text. Tables made before version 8 of the stage hold only those."""
    keep = table.index == table.index
    if "where" in table:
        clamp_multiple = float((config or {}).get("clamp_multiple", 5.0))
        keep &= ~table["frozen_scale"] & (((table["mode"] == "clamp") & (table["where"] == "all")
                                           & (table["multiple"] == clamp_multiple))
                                          | ((table["mode"] == "ablate") & (table["where"] == "firing")))
    if "protocol" in table:
        keep &= table["protocol"] == "clamp"
    return table[keep].reset_index(drop=True)


def causal_cells(config: dict) -> dict[tuple[str, float, str, bool], str]:
    """The cells of the causal test's design, (mode, multiple, where, LayerNorm scale frozen) -> a label, in the
    order the book shows them: the clamp at 1x and at ``clamp_multiple`` on every position and where the
    feature fires, the ablation where it fires, as computed and with the scale frozen."""
    x = float(config.get("clamp_multiple", 5.0))
    return {("clamp", 1.0, "all", False): "clamp 1x, every position",
            ("clamp", x, "all", False): f"clamp {x:g}x, every position",
            ("clamp", 1.0, "firing", False): "clamp 1x, where it fires",
            ("clamp", x, "firing", False): f"clamp {x:g}x, where it fires",
            ("ablate", 0.0, "firing", False): "ablate, where it fires",
            ("ablate", 0.0, "firing", True): "ablate, LayerNorm scale frozen"}


def causal_cell(table, key: tuple[str, float, str, bool]):
    """The rows of a version-8 causal table in one cell of the design (:func:`causal_cells`)."""
    import numpy as np

    mode, multiple, where, frozen = key
    return table[(table["mode"] == mode) & np.isclose(table["multiple"], multiple) & (table["where"] == where)
                 & (table["frozen_scale"] == frozen)]


def mean_rank_test(ranks, n_controls: int) -> tuple[float, float]:
    """The mean of ``ranks`` among ``n_controls`` + 1 directions and its two-sided p against ranks uniform on
    1..n_controls + 1 (the normal approximation, from the uniform's variance; ties aside)."""
    import numpy as np
    from scipy.stats import norm

    ranks = np.asarray(ranks, dtype=np.float64)
    mu, var = (n_controls + 2) / 2, ((n_controls + 1) ** 2 - 1) / 12
    z = (ranks.mean() - mu) / math.sqrt(var / len(ranks))
    return float(ranks.mean()), float(2 * norm.sf(abs(z)))


def holm(ps) -> Any:
    """Holm's step-down adjustment of p-values (controls the family-wise error over all of them)."""
    import numpy as np

    ps = np.asarray(ps, dtype=np.float64)
    adj, running = np.empty(len(ps)), 0.0
    for i, j in enumerate(np.argsort(ps, kind="stable")):
        running = max(running, min(1.0, (len(ps) - i) * ps[j]))
        adj[j] = running
    return adj


class RankTest(NamedTuple):
    features: int  # features with the measure defined in the cell
    mean: float  # their mean rank among the cell's control directions
    chance: float  # the mean rank of one more control direction
    p: float  # two-sided, against uniform ranks
    p_holm: float  # adjusted over every mean-rank test of the table
    first: int  # features ahead of every control direction (rank 1)
    last: int  # features behind every control direction (rank n + 1)
    p_ends: float  # one-sided binomial: more features at either end than the 2 / (n + 1) of uniform ranks
    p_ends_holm: float  # adjusted over every ends test of the table


CONTROL_RANKS = {"random": ("", "n_random"), "decoder": ("_dec", "n_decoder")}
"""A control's rank columns in ``causal.parquet`` (``<measure>_rank<suffix>``) and its count column."""


def causal_rank_tests(table, config: dict, control: str = "random", cells=None, measures=LEADER_MEASURES
                      ) -> dict[tuple[tuple[str, float, str, bool], str], RankTest]:
    """The rank tests of each cell of the design (``cells``, default all of :func:`causal_cells`) and each of
    ``measures``, from a version-8 ``causal.parquet``, among ``control``'s directions ("random" or "decoder": other
    features' decoder directions): the mean rank against uniform ranks, and the count at either end against
    uniform ranks (a split effect, some features far ahead and some far behind, leaves the mean at chance), each
    with Holm's adjustment over all of the tests returned. Rank 0 (undefined: nothing predicted) is left out."""
    from scipy.stats import binom

    suffix, count = CONTROL_RANKS[control]
    feats = table[table["direction"] == "feature"]
    raw = []
    for key in cells or causal_cells(config):
        part = causal_cell(feats, key)
        if part.empty:
            continue
        n = int(part[count].iloc[0])
        for m in measures:
            r = part[f"{m}_rank{suffix}"].to_numpy()
            r = r[r > 0]
            if len(r):
                first, last = int((r == 1).sum()), int((r == n + 1).sum())
                p_ends = float(binom.sf(first + last - 1, len(r), 2 / (n + 1)))
                raw.append(((key, m), len(r), *mean_rank_test(r, n), (n + 2) / 2, first, last, p_ends))
    adjusted, adjusted_ends = holm([t[3] for t in raw]), holm([t[7] for t in raw])
    return {k: RankTest(n, mean, chance, p, float(a), first, last, p_ends, float(ae))
            for (k, n, mean, p, chance, first, last, p_ends), a, ae in zip(raw, adjusted, adjusted_ends, strict=True)}


def holm_jointly(*families: dict) -> list[dict]:
    """``families`` of :class:`RankTest` (as :func:`causal_rank_tests` returns them, each adjusted on its own)
    with ``p_holm`` and ``p_ends_holm`` adjusted over all of them together: one family of tests for a table that
    shows them together."""
    keys = [(i, k) for i, fam in enumerate(families) for k in fam]
    tests = [families[i][k] for i, k in keys]
    adjusted, ends = holm([t.p for t in tests]), holm([t.p_ends for t in tests])
    out: list[dict] = [{} for _ in families]
    for (i, k), t, a, e in zip(keys, tests, adjusted, ends, strict=True):
        out[i][k] = t._replace(p_holm=float(a), p_ends_holm=float(e))
    return out


def causal_rank_table(table, config: dict) -> tuple[dict, dict]:
    """The rank tests chapter 3's table shows, adjusted together (:func:`holm_jointly`): every cell and token
    set among the random directions, and the main clamp and the ablation where it fires among other features'
    decoder directions, with their own predicted tokens ("self") as a fourth set."""
    x = float(config.get("clamp_multiple", 5.0))
    decoder = causal_rank_tests(table, config, control="decoder",
                                cells=[("clamp", x, "all", False), ("ablate", 0.0, "firing", False)],
                                measures=(*LEADER_MEASURES, "self"))
    random, decoder = holm_jointly(causal_rank_tests(table, config), decoder)
    return random, decoder


class FittedTest(NamedTuple):
    control: str
    features: int  # features with a value for both the feature and the control in the cell
    wins: int  # how many of them move the tokens further than the control, the way the edit should go
    p: float  # two-sided sign test of wins against losses (ties left out)
    feature_median: float  # the features' median change in log-odds
    control_median: float  # the control's
    wins_per_kl: int  # the same count with each change divided by the square root of its edit's KL
    p_per_kl: float  # its sign test
    feature_kl: float  # the features' median KL (nats)
    control_kl: float  # the control's
    p_wilcoxon: float  # two-sided signed-rank test of the raw differences (their sizes as well as signs)


def causal_fitted(table, key: tuple[str, float, str, bool], measure: str, control: str) -> FittedTest:
    """The features of a version-8 ``causal.parquet`` against one control row per feature (``control``:
    "mean_difference", "best_neuron", or "random", the mean of its random directions) in one cell of the design,
    on the change in log-odds of ``measure``'s tokens: how often the feature moves them further the way its
    edit should (up when clamped, down when ablated), with a sign test; and the same per square root of the
    edit's KL (a direction pushed as hard in the residual stream may still move the whole distribution more: for
    a small push the change in log-odds grows with its size and the KL with its square)."""
    import numpy as np
    from scipy.stats import binomtest, wilcoxon

    def sign_test(d):
        wins, losses = int((d > 0).sum()), int((d < 0).sum())
        return wins, (float(binomtest(wins, wins + losses).pvalue) if wins + losses else float("nan"))

    part = causal_cell(table, key)
    col = f"{measure}_logodds"
    f = part[part["direction"] == "feature"].set_index("feature")[[col, "kl"]]
    c = part[part["direction"] == control].set_index("feature")[[col, "kl"]]
    both = f.add_suffix("_f").join(c.add_suffix("_c"), how="inner").dropna()
    sign = 1.0 if key[0] == "clamp" else -1.0
    d = sign * (both[f"{col}_f"] - both[f"{col}_c"])
    wins, p = sign_test(d)
    root = lambda kl: np.sqrt(np.clip(kl, 1e-12, None))  # noqa: E731 (the fast read-out can dip below 0 by ~1e-4)
    wins_kl, p_kl = sign_test(sign * (both[f"{col}_f"] / root(both["kl_f"]) - both[f"{col}_c"] / root(both["kl_c"])))
    p_w = float(wilcoxon(d).pvalue) if (d != 0).sum() else float("nan")
    return FittedTest(control, len(both), wins, p, float(both[f"{col}_f"].median()), float(both[f"{col}_c"].median()),
                      wins_kl, p_kl, float(both["kl_f"].median()), float(both["kl_c"].median()), p_w)


class FamilyTest(NamedTuple):
    families: int  # families with at least one feature whose rank is defined in the cell
    ahead: int  # families whose features' mean rank is better than chance
    behind: int  # ... worse than chance
    p: float  # two-sided sign test of ahead against behind


def causal_family_test(table, key: tuple[str, float, str, bool], measure: str) -> FamilyTest:
    """The features' ranks among random directions averaged within each family (features of one family may be
    split siblings, not independent draws), and a sign test over families of being ahead of chance."""
    from scipy.stats import binomtest

    part = causal_cell(table[table["direction"] == "feature"], key)
    part = part[part[f"{measure}_rank"] > 0]
    if part.empty:
        return FamilyTest(0, 0, 0, float("nan"))
    chance = (int(part["n_random"].iloc[0]) + 2) / 2
    means = part.groupby("family")[f"{measure}_rank"].mean()
    ahead, behind = int((means < chance).sum()), int((means > chance).sum())
    p = float(binomtest(ahead, ahead + behind).pvalue) if ahead + behind else float("nan")
    return FamilyTest(len(means), ahead, behind, p)
