"""Metrics on text and numbers (no models): stats (means, stderrs, intervals), overlap (BLEU, chrF, TER,
ROUGE), winrate (both-orders judge comparisons), preference (preference accuracy, metric-human
agreement), reward (best-of-N KL, lengths)."""
