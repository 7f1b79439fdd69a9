"""The control plane: Redis records, the balancer, the register and the student's discovery client."""
