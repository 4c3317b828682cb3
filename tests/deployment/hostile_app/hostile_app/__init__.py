"""A dishonest coordinator's app (tests only): a ServerApp that sends honest round plans with an
attack to carry out, and a ClientApp that carries it out at the hospital."""
