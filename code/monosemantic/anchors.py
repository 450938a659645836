"""Published facts and logged figures of the work we reproduce, with where each comes from.

These are the only numbers in the book that our code does not compute: they are what the anchor's
repository and Anthropic's paper state, and the chapters print them beside ours. Sources:
``ward``: jnward/monosemanticity-repro ("Monosemanticity at Home"), its README, code and logged training
run; ``bricken``: Bricken et al. 2023, "Towards Monosemanticity" (transformer-circuits.pub). The figures are
collected in ``shared/ANCHORS.md`` §A and §B.
"""

from __future__ import annotations

WARD: dict[str, object] = {
    "lm_train_tokens": 200_000 * 32 * 128,  # 200,000 steps x batch 32 x context 128 (~819M)
    "lm_data": "a subset of the Pile",
    "sae_n_features": 4096,
    "sae_train_activations": 100_000 * 896,  # 100,000 steps x batch 896 (~90M)
    "sae_batch_size": 896,
    "sae_lr": 1e-4,
    "sae_l1_coeff": 3e-3,
    "sae_resample_every": 1000,
    "sae_mse": 0.094,  # logged end state, "about"
    "sae_l1": 0.05,  # logged L1 term at the end, "about"
    "sae_dead_fraction": (0.30, 0.40),  # "30-40% dead through most of training"
    "sae_hours": 11,  # on an Apple M3 laptop, ~2.5 steps/s
    "features": ("`{` in code", "LaTeX `$`", "Scandinavian-language text", "citation markers such as `[@b`",
                 "`' was'`", "`'!'`"),
}

BRICKEN: dict[str, object] = {
    "lm_train_tokens": 100_000_000_000,  # 100B tokens of the Pile
    "lm_data": "the Pile",
    "sae_n_features": 4096,  # run A/1
    "sae_widths": (512, 131_072),  # dictionaries from 1x to 256x
    "sae_train_activations": 8_000_000_000,  # 8B activations
    "features": ("Arabic script", "DNA", "base64", "Hebrew", "HTTP requests", "legal text", "nutrition statements"),
    "arabic_token_share": 0.0013,  # Arabic is 0.13% of training tokens ...
    "arabic_feature_share": 0.81,  # ... but 81% of the tokens on which the Arabic feature fires
}
