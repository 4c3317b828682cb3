"""Input-level privatization: a site privatizes its own images once, then trains on them.

Everything trained on privatized inputs is post-processing of them, so the input mechanism's
epsilon is the whole story for the images (not for the reports: see each mechanism's statement).

- ``inn``: a conditional invertible network (FrEIA, GLOW couplings) trained by maximum likelihood
  on public images only, mapping an image to a Gaussian latent and back exactly.
- ``latent``: per-image clipping of a latent and Gaussian or Laplace noise, with its accounting.
- ``cadp``: content-aware DP (Toelle et al. 2022), corrected: encode, clip, noise, decode.
"""
