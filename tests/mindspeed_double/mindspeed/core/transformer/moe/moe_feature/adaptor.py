"""`mindspeed/core/transformer/moe/moe_feature/adaptor.py:101-104` (26.0.0_core_r0.12.1):
`class MindSpeedGmmExperts(GmmExpertsImpl, MegatronGroupedMLP)`, whose __init__ is
GmmExpertsImpl's: a subclass of Megatron's GroupedMLP from a mindspeed.* module."""
from mindspeed.core.transformer.moe.moe_feature import GroupedMLP as MegatronGroupedMLP
from mindspeed.core.transformer.moe.moe_feature.gmm.experts import GmmExpertsImpl


class MindSpeedGmmExperts(GmmExpertsImpl, MegatronGroupedMLP):
    def __init__(self, *args, **kwargs):
        GmmExpertsImpl.__init__(self, *args, **kwargs)
