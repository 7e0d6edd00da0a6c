"""What a kind of dictionary can do beyond the `SparseDictionary` contract, as runtime-checkable protocols: the
initializer takes a data-driven step only on kinds that have it (and says so when one is asked for explicitly)."""

from typing import Protocol, runtime_checkable

from torch import Tensor

from lm_saes_core.models.base import Batch


@runtime_checkable
class NormConstrainable(Protocol):
    def set_decoder_to_fixed_norm(self, value: float, force_exact: bool) -> None: ...


@runtime_checkable
class EncoderInitializable(Protocol):
    def init_encoder_with_decoder_transpose(self, factor: float) -> None: ...


@runtime_checkable
class DecoderBiasInitializable(Protocol):
    def init_decoder_bias(self, center: Tensor) -> None: ...


@runtime_checkable
class EncoderBiasInitializable(Protocol):
    def init_encoder_bias_with_mean_hidden_pre(self, batch: Batch) -> None: ...
