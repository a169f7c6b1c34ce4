"""Entry points for other training frameworks (NeMo, Megatron-Bridge); see :mod:`.nemo`."""
