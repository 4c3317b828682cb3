"""Private hyperparameter tuning: a random number of full federated DP runs, the best one released,
the whole search charged to every site (``fedclip.privacy.selection``)."""
