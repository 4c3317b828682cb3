"""Server strategies: a privacy-budget wrapper around any Flower strategy, its distributed form over
secure aggregation, and the secure sum's two halves.

Import the modules themselves (``strategies.privacy_budget``, ``strategies.secure_sum``, ...): this
package imports nothing, so a ClientApp process that needs only the secure sum's client half
(Flower's SecAgg+ mod) does not load torch and the accountants with it.
"""
