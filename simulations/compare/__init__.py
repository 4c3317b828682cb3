"""Central versus federated DP: a matrix of hospital_clip runs on the same data, model and budget."""
