"""Bridges to the field's models and conventions.

* ``scoresde.interop.score_sde`` -- the score-SDE paper's checkpoints (score_sde_pytorch: NCSN++, DDPM++, DDPM);
* ``scoresde.interop.diffusers`` -- diffusers ``UNet2DModel`` (optional extra ``diffusers``);
* ``scoresde.interop.karras`` -- the EDM / k-diffusion denoiser convention ``D(x, sigma)``.

Import the submodule you need; nothing is imported here, so optional dependencies stay optional.
"""
