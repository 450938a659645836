"""Published facts and logged figures of the work we reproduce, with where each comes from.

These are the only numbers in the book that our code does not compute: they are what the anchor's
repository and Anthropic's paper state, and the chapters print them beside ours. Sources:
``ward``: jnward/monosemanticity-repro ("Monosemanticity at Home"), its README, code and logged training
run (``WARD_SOURCES`` gives the file and notebook cell of each fact); ``bricken``: Bricken et al. 2023,
"Towards Monosemanticity" (transformer-circuits.pub; ``BRICKEN_SOURCES`` names the section of each). The
figures are collected in ``shared/ANCHORS.md`` §A and §B.
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
    "sae_steps": 100_000,
    "sae_dead_check_inputs": 10_240,  # `neuron_resampling_samples`: drawn afresh, 10,240 // 896 = 11 batches
    "sae_mse": 0.094,  # logged end state, "about"
    "sae_l1": 0.052,  # logged L1 term at the end (the last progress line, step 95,000; ANCHORS.md: "about 0.05")
    "sae_dead_fraction": (0.30, 0.40),  # "30-40% dead through most of training"
    "sae_hours": 11,  # on an Apple M3 laptop, ~2.5 steps/s
    "features": ("`{` in code", "LaTeX `$`", "Scandinavian-language text", "citation markers such as `[@b`",
                 "`' was'`", "`'!'`"),
    # --- printed in the outputs of neuron_resampling.ipynb (read from the notebook's JSON; cells by index,
    # 0-based; execution counts vary because the notebook was run over several sessions) ---
    # the language model, `estimate_loss(64)`: 64 random batches of 32 x 128 tokens from each file
    "lm_dev_loss": 4.4350,  # 'dev': data/pile_val.h5
    "lm_train_loss": 4.4069,  # 'train': data/med_pile_train.h5
    "lm_loss_tokens": 64 * 32 * 128,
    # the SAE spliced in (`forward_ablated`: the MLP hidden layer replaced before the down-projection, its
    # bias kept), 16 random batches of 32 x 128 tokens of the *training* file data/med_pile_train.h5
    "ce_loss_clean": 4.5109544694423676,
    "ce_loss_sae": 5.106215983629227,
    "ce_loss_zero": 6.797475069761276,  # hidden layer zeroed
    "ce_loss_recovered_printed": 0.739664924031808,  # (zero - sae) / (zero - clean), as printed
    "ce_loss_tokens": 16 * 32 * 128,
    # L0: features > 1e-3 per input, one batch of 4,096 inputs (one random position per training sequence)
    "sae_l0_mean": 21.01,
    "sae_l0_median": 21.0,
    "sae_l0_tokens": 4096,
    "sae_l0_threshold": 1e-3,
    # Per-unit interpretability ratings, 1 (no clear singular function) to 5 (clear, singular function).
    # Hand ratings: typed at an `input("Rating: ")` prompt, one unit at a time, neuron or feature chosen by a
    # coin flip and not shown, each unit shown as its 10 strongest (token, 9-token context) pairs among units
    # firing on at least 100 sampled positions. The two lists as printed:
    "ratings_manual_neurons": (5, 3, 1, 4, 1, 5, 5, 1, 1, 1, 3, 2, 1, 4, 2, 4, 2, 1, 4, 1, 1, 1, 5, 1, 2, 1, 1,
                               1, 4, 4, 5, 5, 4, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 5, 1, 2, 1, 1, 1, 3, 2, 1),
    "ratings_manual_features": (4, 2, 2, 5, 5, 5, 1, 5, 5, 5, 3, 5, 5, 5, 5, 5, 4, 5, 1, 5, 5, 5, 5, 3, 5, 5,
                                5, 4, 5, 3, 5, 3, 5, 5, 2, 5, 5, 3, 4, 1, 1, 5, 5, 3, 5, 5, 5, 2),
    "ratings_manual_n": 100,  # the figure's title, "Manual Interpretability Scores (N = 100)"
    # Automated ratings: GPT-4 (OpenAI chat API) asked for a few-word description and an
    # `interpretabilityScore` on the same 1-5 scale, 12 shuffled units (neurons and features mixed, not
    # labelled) per request, the same 10 (token, context) pairs per unit. The scores themselves are not
    # printed; only their number and means, in the legend of the plotted histograms, and the features' median.
    "ratings_llm_model": "gpt-4",
    "ratings_llm_n": 192,  # the figure's title, "Automated Interpretability Scores (N = 192)"
    "ratings_llm_mean_neurons": 2.72,  # figure legend (an image output)
    "ratings_llm_mean_features": 3.41,  # figure legend (an image output)
    "ratings_llm_median_features": 3.0,  # printed: np.median(a_scores)
    "sae_compute": "float32 on an Apple-silicon GPU (`device = 'mps'`)",
    # --- the logged training run itself (cell 11's progress bars and resampling printouts) ---
    "sae_log_last_step": 95_000,  # the last progress line and resampling check printed (of 100,000 steps)
    "sae_dead_peak": 0.7285,  # "72.85% of neurons are considered dead", the largest share printed ...
    "sae_dead_peak_step": 8_000,  # ... at the check after step 8,000
    # every share it printed, "x% of neurons are considered dead", in order: the checks after steps 1,000,
    # 2,000, ... (the 8th is the peak above); 94 checks printed
    "sae_dead_per_check": (
        0.0684, 0.2625, 0.3186, 0.3545, 0.4375, 0.4944, 0.5938, 0.7285, 0.7183, 0.6960,
        0.6528, 0.6570, 0.6416, 0.6152, 0.5535, 0.5540, 0.5439, 0.5330, 0.5447, 0.4080,
        0.5034, 0.4194, 0.4448, 0.3994, 0.4456, 0.3745, 0.4270, 0.3660, 0.4224, 0.2617,
        0.4619, 0.2393, 0.3730, 0.3474, 0.3218, 0.2441, 0.3037, 0.3625, 0.2727, 0.3379,
        0.3088, 0.3496, 0.2700, 0.3745, 0.3149, 0.3369, 0.2852, 0.3713, 0.3792, 0.3306,
        0.3184, 0.3254, 0.3247, 0.3369, 0.2935, 0.3579, 0.3508, 0.3489, 0.3140, 0.2834,
        0.4041, 0.3230, 0.3711, 0.3550, 0.3674, 0.3643, 0.3555, 0.3489, 0.3584, 0.3704,
        0.3896, 0.3191, 0.4001, 0.3599, 0.3540, 0.3770, 0.3975, 0.3513, 0.3284, 0.4238,
        0.3577, 0.3201, 0.4272, 0.3796, 0.3813, 0.3789, 0.3965, 0.4124, 0.3906, 0.3816,
        0.4185, 0.4167, 0.3438, 0.4316,
    ),
    # The checkpoint evaluated below the training cell: cell 19 saves the trained SAE to
    # models/neuron_resampling_test_5_0.004-896-1e-4-1000-1000000_scratch_4096.pt (only if no such file
    # exists), and cell 20 loads another file, ..._test_6_0.003-..., so the notebook does not show that the
    # SAE it evaluates (CE loss, L0, ratings) is the one whose training it logs.
    "sae_checkpoint_saved": "neuron_resampling_test_5_0.004-896-1e-4-1000-1000000_scratch_4096.pt",
    "sae_checkpoint_loaded": "neuron_resampling_test_6_0.003-896-1e-4-1000-1000000_scratch_4096.pt",
    # The units' contexts for both kinds of rating (cells 36, 42): 16,000 batches of 16 training sequences
    # (train_path), 4 random positions per sequence; a unit fires where it exceeds 1e-5; each firing is kept
    # with a 9-token window (4 tokens either side), but only a unit's first 511 firings are kept; a unit is
    # shown if it fired on at least 100 of the sampled positions, as the 10 strongest of those kept (token,
    # window) pairs; units come in index order.
    "ratings_context_before": 4,
    "ratings_context_after": 4,
    "ratings_positions_per_sequence": 4,
    "ratings_sampled_positions": 16_000 * 16 * 4,
    "ratings_min_firings": 100,
    "ratings_kept_firings": 511,
    "ratings_shown": 10,
}

# Where each of WARD's facts is written (repository jnward/monosemanticity-repro; notebook cells by 0-based
# index in the committed notebook's JSON).
WARD_SOURCES: dict[str, str] = {
    "lm_train_tokens": "config.py (T_TRAIN_STEPS, T_BATCH_SIZE, T_CONTEXT_LENGTH)",
    "sae_train_activations": "neuron_resampling.ipynb cell 9 (train_steps, batch_size)",
    "sae_batch_size": "neuron_resampling.ipynb cell 9", "sae_lr": "neuron_resampling.ipynb cell 9",
    "sae_l1_coeff": "neuron_resampling.ipynb cell 9 (lambda_reg)",
    "sae_resample_every": "neuron_resampling.ipynb cell 9 (resample_frequency)",
    "sae_steps": "neuron_resampling.ipynb cell 9 (train_steps)",
    "sae_dead_check_inputs": "neuron_resampling.ipynb cells 9 and 11 (neuron_resampling_samples)",
    "sae_mse": "neuron_resampling.ipynb cell 11 (progress bar, 100-step means near the end)",
    "sae_l1": "neuron_resampling.ipynb cell 11", "sae_dead_fraction": "neuron_resampling.ipynb cell 11",
    "sae_hours": "neuron_resampling.ipynb cell 11 (progress bar: ~2.5 it/s, 11 h estimated)",
    "lm_dev_loss": "neuron_resampling.ipynb cell 7 (estimate_loss(64))",
    "lm_train_loss": "neuron_resampling.ipynb cell 7", "lm_loss_tokens": "neuron_resampling.ipynb cells 4 and 7",
    "ce_loss_clean": "neuron_resampling.ipynb cell 32", "ce_loss_sae": "neuron_resampling.ipynb cell 32",
    "ce_loss_zero": "neuron_resampling.ipynb cell 32",
    "ce_loss_recovered_printed": "neuron_resampling.ipynb cell 32", "ce_loss_tokens": "neuron_resampling.ipynb cell 32",
    "sae_l0_mean": "neuron_resampling.ipynb cell 30", "sae_l0_median": "neuron_resampling.ipynb cell 30",
    "sae_l0_tokens": "neuron_resampling.ipynb cell 30", "sae_l0_threshold": "neuron_resampling.ipynb cell 30",
    "ratings_manual_neurons": "neuron_resampling.ipynb cell 53 (print(t_ratings)); made in cell 50",
    "ratings_manual_features": "neuron_resampling.ipynb cell 53 (print(a_ratings)); made in cell 50",
    "ratings_manual_n": "neuron_resampling.ipynb cell 51 (figure title)",
    "ratings_llm_model": "neuron_resampling.ipynb cell 45 (prompt and `model=\"gpt-4\"`)",
    "ratings_llm_n": "neuron_resampling.ipynb cells 46 and 51 (figure titles)",
    "ratings_llm_mean_neurons": "neuron_resampling.ipynb cells 46 and 51 (figure legend)",
    "ratings_llm_mean_features": "neuron_resampling.ipynb cells 46 and 51 (figure legend)",
    "ratings_llm_median_features": "neuron_resampling.ipynb cell 47",
    "sae_compute": "neuron_resampling.ipynb cell 0",
    "sae_log_last_step": "neuron_resampling.ipynb cell 11 (last progress line: 95000/100000)",
    "sae_dead_peak": "neuron_resampling.ipynb cell 11 (resampling printout after step 8,000)",
    "sae_dead_peak_step": "neuron_resampling.ipynb cell 11",
    "sae_dead_per_check": "neuron_resampling.ipynb cell 11 (each resampling printout, in order)",
    "sae_checkpoint_saved": "neuron_resampling.ipynb cell 19 (torch.save under `if not os.path.exists(path)`)",
    "sae_checkpoint_loaded": "neuron_resampling.ipynb cell 20 (torch.load)",
    "ratings_context_before": "neuron_resampling.ipynb cell 36 (context = row[max(j-4, 0):j+5])",
    "ratings_context_after": "neuron_resampling.ipynb cell 36",
    "ratings_positions_per_sequence": "neuron_resampling.ipynb cell 36 (samples_per_row = 4)",
    "ratings_sampled_positions": "neuron_resampling.ipynb cell 36 (num_iters = 16000, batch_size = 16)",
    "ratings_min_firings": "neuron_resampling.ipynb cells 37 and 42 (`if count < 100: continue`)",
    "ratings_kept_firings": "neuron_resampling.ipynb cell 36 (`if feature_dict[a_idx][0] < 512`)",
    "ratings_shown": "neuron_resampling.ipynb cell 42 (ctxs[:10])",
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
    # Evaluations of run A/1 as we read the paper (shared/ANCHORS.md section B; BRICKEN_SOURCES says where)
    "ce_loss_recovered_a1": 0.79,  # share of the MLP's loss reduction recovered (vs zero-ablating the MLP)
    "ce_loss_recovered_a5": 0.945,  # run A/5, 131,072 features
    "dead_a1": 168,  # about 168 of A/1's 4,096 features dead
    "rubric_median_features": 12,  # human rubric on randomly sampled activation intervals: median score ...
    "rubric_median_neurons": 0,  # ... 12 for features against 0 for neurons
    "logit_test_features": 0.74,  # automated logit-weight test: share of features passing ...
    "logit_test_neurons": 0.58,  # ... against neurons (chance 50%)
    "logit_test_chance": 0.50,
    # feature-density histograms: above about this density a feature is suspect (too broad), as the
    # ultra-low cluster is at the other end
    "density_high_warning": 1e-2,
}

BRICKEN_SOURCES: dict[str, str] = {
    "lm_train_tokens": "section 'Problem Setup' (the one-layer transformer, 100B tokens of the Pile)",
    "sae_n_features": "section 'Problem Setup' (run A/1)",
    "sae_widths": "section 'Feature Splitting' (runs A/0 to A/5)",
    "sae_train_activations": "section 'Problem Setup' (8 billion activations)",
    "features": "section 'Detailed Investigations of Individual Features' and the feature browser",
    "arabic_token_share": "section 'Arabic Script Feature'", "arabic_feature_share": "section 'Arabic Script Feature'",
    "ce_loss_recovered_a1": "section 'How Much of the Model Does Our Dictionary Explain?'",
    "ce_loss_recovered_a5": "section 'How Much of the Model Does Our Dictionary Explain?'",
    "dead_a1": "appendix on dead and ultralow-density features",
    "rubric_median_features": "section 'Interpretability', manual rubric scores of activation intervals",
    "rubric_median_neurons": "section 'Interpretability', manual rubric scores of activation intervals",
    "logit_test_features": "section 'Interpretability', automated interpretability of logit weights",
    "logit_test_neurons": "section 'Interpretability', automated interpretability of logit weights",
    "logit_test_chance": "section 'Interpretability', automated interpretability of logit weights",
    "density_high_warning": "the feature-density discussion of the dictionary-learning appendix (as read by "
                            "our referee; not checked against the page here)",
}
