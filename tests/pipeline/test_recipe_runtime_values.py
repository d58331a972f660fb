"""The recipe's SALS layers store values at the KV step's value width."""

from compactlm.attention.sals import SALSConfig
from compactlm.kv.config import KVQuant
from compactlm.recipes.runtime import sals_with_kv_values


def test_sals_values_follow_the_kv_steps_value_bits_not_its_key_bits():
    sals = SALSConfig()
    assert sals_with_kv_values(sals, KVQuant(bits=4), 64).value_bits == 4
    assert sals_with_kv_values(sals, KVQuant(bits=2, key_bits=4), 64).value_bits == 2
    assert sals_with_kv_values(sals, KVQuant(bits=2, value_bits=4), 64).value_bits == 4
    assert sals_with_kv_values(SALSConfig(value_bits=8), KVQuant(bits=2), 64).value_bits == 8  # its own choice wins
    assert sals_with_kv_values(sals, None, 64) is sals
