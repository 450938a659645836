"""Sparse autoencoders: one module, two architectures, one trainer (``model``, ``fit`` and ``io`` here).

An SAE rewrites an activation vector ``x`` (``d_in`` numbers) as a sparse, non-negative combination of
``n_features`` learned directions (the rows of ``W_dec``) plus a bias::

    f     = act(W_enc^T (x - b_dec) + b_enc)        (n_features,)  sparse latents
    x_hat = f @ W_dec + b_dec                        (d_in,)

``architecture`` picks ``act``:

- ``"relu"``: ReLU, and sparsity comes from an L1 penalty. This is the recipe of Bricken et al. 2023 as
  the anchor (jnward/monosemanticity-repro) implements it: pre-encoder bias = ``b_dec`` subtracted from the
  input, decoder renormalised after every step, loss = MSE + ``l1_coeff`` * (sum over features of |f|,
  mean over the batch), where MSE is ``F.mse_loss``, i.e. the mean over batch *and* ``d_in``; dead
  features are resampled every ``resample_every`` steps (:func:`resample_dead`). Three switches give the
  anchor's own algorithm exactly (``init="anchor-linear"``, ``decoder_norm_axis="input"``,
  ``resample_rule="anchor"``); their defaults are the fixed recipe (unit feature directions, Anthropic's
  resampling, Gao et al.'s initialisation).
- ``"topk"``: keep the ``k`` largest pre-activations (then ReLU), no L1 (Gao et al. 2024). Dead latents
  are pushed back to life by the AuxK loss (:func:`auxk_loss`): the ``aux_k`` largest dead latents must
  reconstruct the residual the live ones left, weighted 1/32 (Gao et al. 2024, appendix A.2).

Weights use SAELens names and shapes (``W_enc`` (d_in, n_features), ``b_enc``, ``W_dec`` (n_features,
d_in), ``b_dec``); :func:`save` writes SAELens 6's on-disk format (``cfg.json`` + ``sae_weights.safetensors``)
so other tools can read our SAEs, and :func:`load` reads SAELens's standard and TopK SAEs as well as ours.

>>> cfg = SAEConfig(d_in=512, n_features=4096)
>>> sae, history = train(cfg, activations)      # activations: (N, 512) tensor or iterator of batches
>>> out = sae(x)                                 # SAEOutput(recon, latents, pre_acts, loss, mse, l1, aux)
"""

from .fit import (  # noqa: F401
    IndexedSource,
    Parallel,
    TrainResult,
    make_optimizer,
    train,
    train_step,
)
from .io import (  # noqa: F401
    OUR_CFG_KEY,
    PRE6_METADATA_KEYS,
    SAELENS_FORMAT_VERSION,
    TO_SAELENS,
    WEIGHT_NAMES,
    export,
    load,
    read_metadata,
    saelens_cfg,
    save,
)
from .model import (  # noqa: F401
    ARCHITECTURES,
    AUX_DENSE_FRACTION,
    B_DEC_INITS,
    DECODER_NORM_AXES,
    DECODES,
    DENSE_GATHER_FRACTION,
    DTYPES,
    INITS,
    RESAMPLE_ENCODER_SCALE,
    RESAMPLE_RULES,
    SAE,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    Architecture,
    SAEConfig,
    SAEOutput,
    TrainOutput,
    auxk_loss,
    evaluate,
    geometric_median,
    never_fired,
    resample_dead,
)
