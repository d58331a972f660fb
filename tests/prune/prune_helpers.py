"""Assertions shared by the pruning tests (imported by name: pytest puts this folder on sys.path)."""

from compactlm.models import get_adapter
from compactlm.prune import is_nm
from compactlm.prune.common import n_pruned


def assert_init_sparsity_kept(model, init, sparsity: float = 0.5) -> None:
    """Every linear still has the initial method's pattern: valid N:M, or exactly ``sparsity`` per output row."""
    a = get_adapter(model)
    for i in range(a.num_layers):
        for name, lin in a.linears(i).items():
            if init.nm:
                assert is_nm(lin.weight != 0, *init.nm), name
            else:
                assert ((lin.weight == 0).sum(1) == n_pruned(lin.in_features, sparsity)).all(), name
