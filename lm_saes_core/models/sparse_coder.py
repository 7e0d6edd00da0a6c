"""`SparseCoder`: what the kinds that encode linearly, activate and decode linearly (SAE, crosscoder, CLT) share:
rows of inputs, the dense path, and the TopK family's sparse path through `kernels.py`.

A kind says how one input row looks (`input_shape`), computes its pre-activations (`_hidden_pre`), gathers the
selected pre-activations of one group of features with their sparse gradient (`_gather`), and decodes rows from
dense features or from a sparse form (`_decode_rows`). Features come in groups (`feature_shape[:-1]`: none for an
SAE, layers for a CLT, heads for a crosscoder); the TopK family selects per group, or across groups for the
activations that span them, and the sparse form is one (selection, values) per group.
"""

import weakref

import torch
from torch import Tensor

from lm_saes_core.models import kernels
from lm_saes_core.models.base import SparseDictionary

Sparse = list[tuple[kernels.Selection, Tensor]]
"""Per group of features: the selected (token, feature) pairs and their activations."""


class SparseCoder(SparseDictionary):
    sparse_kernels: bool | None = None
    """True/False forces the sparse/dense path of the TopK family; None picks sparse when the k per group is at most
    d_sae / 8 (the measured break-even on CPU is near d_sae / 4)."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The trailing dims of one normalised input row (d_model,) or (groups, d_model)."""
        raise NotImplementedError

    def _hidden_pre(self, x: Tensor) -> Tensor:
        """Pre-activations (N, *feature_shape) of input rows x (N, *input_shape)."""
        raise NotImplementedError

    def _gather(self, x: Tensor, hidden_pre: Tensor, group: int, selection: kernels.Selection) -> Tensor:
        """The selected pre-activations of one group, whose gradient reaches the inputs and encoder sparsely."""
        raise NotImplementedError

    def _decode_rows(self, x: Tensor, f: Tensor | None, sparse: Sparse | None, features_only: bool = False) -> Tensor:
        """Reconstructions of rows x from dense features f or from the sparse form; `features_only` leaves out what
        does not come from the features (biases, a skip connection): Aux-K's residual reconstruction."""
        raise NotImplementedError

    @property
    def n_groups(self) -> int:
        return self.n_features // self.cfg.d_sae

    def _use_sparse_kernels(self, k: int) -> bool:
        if not self.uses_k:
            return False
        per_group = k / self.n_groups if self.activation_function.spans_groups else k
        return self.sparse_kernels if self.sparse_kernels is not None else per_group * 8 <= self.cfg.d_sae

    def _select(
        self, x: Tensor, hidden_pre: Tensor, k: int, latent_mask: Tensor | None = None, update_state: bool = True
    ) -> Sparse:
        """The TopK family's selection per group and its values: act(h * n) / n == h on kept entries, so the values
        are the plain pre-activations there."""
        with torch.no_grad():
            scores = hidden_pre.detach()
            norm = self.gating_norm()
            if norm is not None:
                scores = scores * norm
            if latent_mask is not None:
                scores = scores * latent_mask
            selected = self.activation_function.select(scores, k, update_state)
        sparse = []
        for group, (selection, keep) in enumerate(selected):
            values = self._gather(x, hidden_pre, group, selection)
            sparse.append((selection, values * keep if keep is not None else values))
        return sparse

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor, Sparse | None]:
        """(f, h (N, *feature_shape), sparse form or None) of input rows x (N, *input_shape); in the sparse path h
        is detached (the values carry the gradient)."""
        k = self.current_k
        if self._use_sparse_kernels(k):
            with torch.no_grad():
                hidden_pre = self._hidden_pre(x)
            sparse = self._select(x, hidden_pre, k)
            groups = [kernels.densify(selection, values, x.shape[0], self.cfg.d_sae) for selection, values in sparse]
            f = groups[0] if len(groups) == 1 else torch.stack(groups, dim=1)
            return f.reshape(x.shape[0], *self.feature_shape), hidden_pre, sparse
        hidden_pre = self._hidden_pre(x)
        return self.activation_function(hidden_pre, self.gating_norm(), k), hidden_pre, None

    def _rows(self, x: Tensor) -> tuple[tuple[int, ...], Tensor]:
        leading = x.shape[: x.ndim - len(self.input_shape)]
        return leading, x.to(self.cfg.dtype).reshape(-1, *self.input_shape)

    def encode(self, x: Tensor, return_hidden_pre: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Feature activations (..., *feature_shape) of normalised inputs x (..., *input_shape)."""
        leading, rows = self._rows(x)
        f, h, _ = self._features(rows)
        f, h = f.reshape(*leading, *self.feature_shape), h.reshape(*leading, *self.feature_shape)
        return (f, h) if return_hidden_pre else f

    def encode_and_reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        leading, rows = self._rows(x)
        f, h, sparse = self._features(rows)
        y = self._decode_rows(rows, f, sparse)
        shape = self.feature_shape
        f = f.reshape(*leading, *shape)
        self._last_selection = None if sparse is None else (weakref.ref(f), [(s.cols, v.detach()) for s, v in sparse])
        return f, h.reshape(*leading, *shape), y.reshape(*leading, *y.shape[1:])

    _last_selection: tuple[weakref.ref, list[tuple[Tensor, Tensor]]] | None = None
    """The features the last `encode_and_reconstruct` returned (a weak reference) and, per group, their selected
    columns and values, when it took the sparse path."""

    def feature_activity(self, feature_acts: Tensor) -> tuple[Tensor, Tensor] | None:
        """(on how many rows each feature is active (n_features,) float32, the sum of the activations) read from the
        selection, O(rows x k) instead of a pass over the dense (rows, n_features): when `feature_acts` is the tensor
        the last `encode_and_reconstruct` returned from the sparse path; else None.

        Exact: a selected pair is active exactly when its value is positive, and a pair repeats only with value 0."""
        remembered = self._last_selection
        if remembered is None or remembered[0]() is not feature_acts:
            return None
        counts = feature_acts.new_zeros(self.n_features, dtype=torch.float32)
        total = feature_acts.new_zeros((), dtype=torch.float32)
        for group, (cols, values) in enumerate(remembered[1]):
            active = values > 0
            counts.index_add_(0, cols + group * self.cfg.d_sae, active.to(torch.float32))
            total += values.sum(dtype=torch.float32)
        return counts, total

    def group_l0(self, feature_acts: Tensor) -> Tensor:
        """Read from the selection when the sparse path made `feature_acts` (the same numbers: counts of 0/1 summed
        exactly) instead of a pass over the dense activations."""
        counted = self.feature_activity(feature_acts)
        if counted is None:
            return super().group_l0(feature_acts)
        return self.l0_of_counts(counted[0], feature_acts.numel() // self.n_features)

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The feature activations of normalised inputs x (..., *input_shape) as lists (row, feature, value): rows of
        the flattened leading dims, features flattened over `feature_shape`; what `encode` gives, without forming the
        dense (rows, n_features) tensor. The TopK family's sparse path only (else None: use `encode`). Pairs come in
        no particular order and may carry the value 0 (a pair repeats only then)."""
        k = self.current_k
        if not self._use_sparse_kernels(k):
            return None
        _, rows = self._rows(x)
        sparse = self._select(rows, self._hidden_pre(rows), k)
        row = torch.cat([selection.rows for selection, _ in sparse])
        feature = torch.cat([selection.cols + group * self.cfg.d_sae for group, (selection, _) in enumerate(sparse)])
        return row, feature, torch.cat([values for _, values in sparse])

    def aux_loss(self, x: Tensor, hidden_pre: Tensor, residual: Tensor, dead_latents: Tensor, k_aux: int) -> Tensor:
        """Mean over tokens (and output hooks) of ||residual - the top k_aux dead latents' reconstruction||^2, the
        dead latents activated by the dictionary's own activation function."""
        n_dead = self.whole_count(dead_latents)
        if n_dead == 0:
            return residual.new_zeros(())
        k = min(k_aux, n_dead)
        if not self.activation_function.spans_groups:
            k = min(k, self.whole_d_sae)  # k counts one group's features
        dead = dead_latents.reshape(self.feature_shape).to(hidden_pre.dtype)
        if self._use_sparse_kernels(k):
            sparse = self._select(x, hidden_pre, k, latent_mask=dead, update_state=False)
            residual_hat = self._decode_rows(x, None, sparse, features_only=True)
        else:
            if torch.is_grad_enabled() and not hidden_pre.requires_grad:
                hidden_pre = self._hidden_pre(x)  # the sparse path's is detached: Aux-K trains the encoder too
            f_dead = self.activation_function(hidden_pre * dead, self.gating_norm(), k, update_state=False)
            residual_hat = self._decode_rows(x, f_dead, None, features_only=True)
        return (residual - residual_hat).pow(2).sum(-1).mean()
