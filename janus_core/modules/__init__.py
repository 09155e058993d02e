"""Neural network modules of the Janus family, with state-dict keys matching the original checkpoints."""
