"""PPO's value function V(s): a linear head on a backbone's last hidden states (the policy's, or a critic's)."""

from __future__ import annotations

from torch import Tensor, nn


class ValueHead(nn.Module):
    """V(s) = w . h + b on a backbone's last hidden state h, zero-initialised (V = 0 at the start), as in
    Ziegler et al. 2019's code (lm-human-preferences: the value head's weights start at zero)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, states: Tensor) -> Tensor:
        """(N, H) hidden states -> (N,) values, computed in the head's dtype (fp32; float64 under
        ``hardware.precision=64-true``; autocast may compute it in bf16, and PPO upcasts the values)."""
        return self.linear(states.to(self.linear.weight.dtype)).squeeze(-1)
