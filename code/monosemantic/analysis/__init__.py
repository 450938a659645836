"""Features and neurons, measured the same way: ``monosemantic analyze``.

For every SAE feature and, for comparison, every MLP neuron of the one-layer model, over held-out text:

- **statistics**: density, mean, activation quantiles, a log-scale histogram of the non-zero activations;
- **dashboards**: the top activating contexts (one per document, so a list shows breadth, not one long
  text) and samples from lower activation intervals (as in Anthropic's dashboards), each with the
  surrounding tokens and every token's activation; the tokens the unit fires on most;
- **logit effects**: the unit's output direction through the MLP's down-projection, the final LayerNorm
  (its gain and centring folded in, its data-dependent scale left out, as Bricken et al. do) and the
  unembedding: the tokens it promotes and suppresses;
- **automatic monosemanticity scores**, computed identically for every kind of unit:

  1. *explain, then predict* (:mod:`monosemantic.explain`): each unit's explanation is made from its
     dashboard only (top contexts and interval samples on the explanation text; the offline default
     explainer is a token table, the mean activation of each token over the contexts shown, zeros included;
     ``--explainer`` points it at a chat model instead) and scored on held-out text (the val split) as the
     field scores it: by *simulation* (Bills et al. 2023: the correlation of predicted and true activations
     over a mix of the unit's top, interval-sampled and random held-out contexts) and by *detection*
     (EleutherAI delphi: balanced accuracy at telling contexts where it fires from ones where it does not).
     The older score, the whole token table's correlation over every held-out token, is kept beside them
     (``explain_corr``).
  2. *concept specificity*: rule-based detectors (:data:`FAMILIES`) label every token; a unit's best
     family is chosen on the explanation text (the largest share of the unit's activation mass) and its
     score is the share of its activation mass inside that family on the held-out text, beside the
     family's share of all tokens (Anthropic: Arabic is 0.13% of tokens but 81% of the Arabic feature's
     activation).

  A unit is scored only when it fires on at least ``min_heldout_firings`` held-out tokens (and on
  ``min_firings`` explanation tokens); the others are counted as too rare to score. The ``units`` table
  holds ``explanation``, ``sim_corr``, ``detection`` (with ``detection_tpr``, ``detection_tnr``), the older
  ``explain_corr``, ``family_share``, ``family_lift``, ``heldout_firings`` and ``too_rare``.

**Controls.** Four kinds of unit are measured alike: the MLP's neurons, the SAE's features, a *random
dictionary* (unit random directions in the same space with the TopK SAE's encoding, width and k: what a
dictionary scores by chance) and, when its artifact exists, the features of an SAE trained on a randomly
initialised copy of the LM. Because the lift rule and the scores depend on how sparse a unit is, every
comparison is also made within bins of held-out density (:func:`density_bins`), and the headline difference
from the neurons is averaged over those bins with the neurons' density distribution as weights
(:func:`matched_differences`), each with a 95% bootstrap interval over units.

**Positions.** The first position of every window carries outlier activations (nothing to attend to but
itself), so the first ``skip_first_positions`` positions of every window are not measured: they count in no
statistic, score or top context (shown contexts show 0 there). What they would have been is reported apart:
each unit's ``first_pos_top_share``, the share of its top activations that would have been at a window's
first position.

**Units that take both signs.** Every measurement above is of a non-negative quantity: SAE features and
ReLU neurons are non-negative already, but a SiLU-gated neuron (SmolLM2's, Llama's) takes both signs, and a
share of a signed sum is not a share (it can be negative, or 10^16). So every unit, neuron or feature, is
read through its *polarity* p = +1 or -1, the sign that carries more of its activation mass on the
explanation text (p = -1 when the sum of max(-a, 0) exceeds the sum of max(a, 0); ties and non-negative
units get +1), and what is measured is its stronger half, a+ = max(p a, 0): density is the share of tokens
with a+ > 0, the mean, quantiles, histogram, top contexts, interval samples, explanations, held-out
correlation, family share and lift are all of a+, and its logit effects are those of p times its direction
(what it writes when it is active in its polarity). A family share is then a share of a non-negative mass,
in [0, 1] by construction (clipped there against float32 rounding). A non-negative unit has p = +1 and
a+ = a: its numbers are exactly what they were before polarity existed. The ``units`` table records ``p``
(``polarity``) and the share of the unit's |a| mass on the other sign (``other_sign_share``), which the
measurement leaves out; the browser shows both.

The text: ``explain_tokens`` of the train split in windows of the model's context spread evenly over it
(dashboards, explanations, best families) and the whole val split, or held-out windows a caller gives
(:func:`analyze`) (scores, held-out densities). Tables are top-k summaries, small enough to commit; no raw
activations are stored. Every pass reads the text in blocks of ``batch_windows`` windows: two over the
explanation text (statistics and top activations; then interval samples, with the activations around every
example a dashboard shows) and one over the held-out text. Each reads a unit set's activations as their
non-zeros (:class:`~monosemantic.explain.SparseActivations`: a TopK SAE's are k of its n features per token),
never as a dense (tokens, units) matrix: memory does not grow with the text.
"""

# read here by the chapters, the causal stage and the tests, from their homes
from ..comparisons import interpretable_fraction  # noqa: F401
from ..harvest import HOOK, held_out_windows, spread_windows  # noqa: F401
from ..lm import random_lm  # noqa: F401
from ..tokenizer import EOT_ID, N_VOCAB  # noqa: F401  (GPT-2's)
from .families import (  # noqa: F401
    FAMILIES,
    FAMILY_NAMES,
    partial_character_families,
    token_families,
    vocab_family_masks,
    window_families,
)
from .measure import (  # noqa: F401
    analyze,
    split_table,
    token_profiles,
)
from .passes import (  # noqa: F401
    LM_FORWARD,
    AnalysisConfig,
    Stopwatch,
    first_position_share,
    mlp_batches,
    pearson,
    score_context,
)
from .stage import (  # noqa: F401
    CONTROL_TABLES,
    DEFAULT_PROFILE,
    LABELS,
    MAIN_SAE,
    NEURON_TOPK,
    RANDOM_DICTIONARY,
    RANDOM_MODEL,
    TABLES,
    add_arguments,
    control_metrics,
    control_tables,
    drop_control_contexts,
    run,
    run_stage,
    stage_seconds,
    summary_metrics,
)
from .units import (  # noqa: F401
    UnitSet,
    logit_effects,
    logit_extremes,
)
