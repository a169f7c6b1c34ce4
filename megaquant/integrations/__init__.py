"""Entry points for other training frameworks: Megatron-Bridge (:mod:`.bridge`, :mod:`.bridge_ptq`,
:mod:`.bridge_export`) and NeMo 2 (:mod:`.nemo`), with the contract they are checked against
(:mod:`.contract`, :mod:`.source`). See docs/integrations.md."""
