"""Server strategies: a privacy-budget wrapper around any Flower strategy, and its ledger store."""

from fedclip.privacy.ledger_store import LedgerStore
from strategies.privacy_budget import PrivacyBudgetStrategy, SiteRound
from strategies.registry import INNER_STRATEGIES, make_inner_strategy

__all__ = ["INNER_STRATEGIES", "LedgerStore", "PrivacyBudgetStrategy", "SiteRound", "make_inner_strategy"]
