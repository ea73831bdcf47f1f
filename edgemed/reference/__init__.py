"""The reference every artifact is judged against: the PyTorch parent's own forward (parent),
parity at every position and the gates (parity), and the cached parent reference a device without
torch measures fidelity with (cache)."""
