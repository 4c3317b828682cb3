"""Distributed DP over a secure sum: the mathematics, without the network.

Contract. Each site maps a float vector to an integer grid (``grid``), adds its own share of
Skellam noise (``skellam``), and hands the result, reduced modulo ``2**bits``, to a secure sum
(Flower's SecAgg+, driven by the apps). The server learns only the modular sum of the sites'
noisy integer vectors. Skellam noise is closed under addition, so that sum carries exactly
Skellam noise whose variance is the sum of the shares in it; ``adversaries`` turns "whose shares
are in the sum, and who colludes" into one variance per adversary, and ``accounting`` turns
variances into Renyi DP and (epsilon, delta), composed over rounds, with Poisson subsampling.

Nothing here trusts the server; what each epsilon trusts is named in ``adversaries``. The long
argument, with the theorems, is in docs/privacy.md ("Distributed DP").
"""
